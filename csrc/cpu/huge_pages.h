// Transparent huge pages for the backward's fresh gradient buffer.
#pragma once
#include <cstdint>

namespace fsce::cpu {

// Asks for huge pages on [data, data + bytes) (MADV_HUGEPAGE) when the hint
// cannot stall: the host's THP `enabled` is `madvise` (under `always` the
// buffer gets them unasked) and its `defrag` is `defer` or `never`. Under
// `madvise`, `defer+madvise` or `always` defrag, a hinted page fault compacts
// memory synchronously: one call of a 2048 x 128256 bf16 backward took 170 to
// 818 ms on such a host. FSCE_HUGE_PAGES=1 / 0 forces the hint on / off.
// Both are read once per process.
void advise_huge_pages(void* data, int64_t bytes);

}  // namespace fsce::cpu
