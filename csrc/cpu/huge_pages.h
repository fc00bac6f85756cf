// Transparent huge pages for the backward's fresh gradient buffer.
#pragma once
#include <cstdint>

namespace fsce::cpu {

// Asks for huge pages on [data, data + bytes) (MADV_HUGEPAGE) where the hint
// cannot stall. On 4 KiB pages the buffer's first-touch faults cost about as
// much as the kernel, but under THP `defrag` `madvise` (the default),
// `defer+madvise` or `always`, a fault in a hinted region that finds no free
// huge page compacts memory synchronously: single 2048 x 128256 bf16
// backwards took 170 to 818 ms on such a host. So, with THP `enabled` at
// `madvise` (under `always` the buffer gets huge pages unasked): under
// `defrag` `defer` or `never` always hint; otherwise only while the buddy
// allocator holds free huge-page blocks for twice the buffer
// (/proc/buddyinfo, read per call), so the faults need no compaction.
// FSCE_HUGE_PAGES=1 / 0 forces the hint on / off. The settings are read once
// per process.
void advise_huge_pages(void* data, int64_t bytes);

}  // namespace fsce::cpu
