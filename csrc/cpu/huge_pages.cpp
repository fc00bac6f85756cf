// See huge_pages.h for the policy.
#include "huge_pages.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

namespace fsce::cpu {
namespace {

constexpr const char* kThp = "/sys/kernel/mm/transparent_hugepage/";

// The selected (bracketed) word of a THP setting, or "" where it cannot be
// read (not Linux, or no THP).
std::string thp_setting(const char* name) {
  std::ifstream f(std::string(kThp) + name);
  std::string line;
  std::getline(f, line);
  const auto open = line.find('['), close = line.find(']');
  return open == std::string::npos || close == std::string::npos || close < open
             ? std::string()
             : line.substr(open + 1, close - open - 1);
}

enum class Hint { kNever, kAlways, kWhileFree };

struct Policy {
  Hint hint = Hint::kNever;
  uint64_t huge = uint64_t(2) << 20;  // the huge page's size
  int order = 9;                      // its buddy order (4 KiB pages: 2 MiB)
};

Policy read_policy() {
  Policy p;
  uint64_t size = 0;
  std::ifstream(std::string(kThp) + "hpage_pmd_size") >> size;
#if defined(__linux__)
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  if (size >= page && page > 0 && (size & (size - 1)) == 0) {
    p.huge = size;
    p.order = __builtin_ctzll(size / page);
  }
#endif
  const char* forced = std::getenv("FSCE_HUGE_PAGES");
  if (forced && *forced && std::strcmp(forced, "auto") != 0) {
    p.hint = std::strcmp(forced, "0") != 0 ? Hint::kAlways : Hint::kNever;
    return p;
  }
  if (thp_setting("enabled") != "madvise") return p;
  const std::string defrag = thp_setting("defrag");
  p.hint = defrag == "defer" || defrag == "never" ? Hint::kAlways : Hint::kWhileFree;
  return p;
}

// Free blocks of the huge page's size in every zone (/proc/buddyinfo: free
// blocks per order; a block of order k > `order` holds 2^(k - order)).
uint64_t free_huge_blocks(int order) {
  std::ifstream f("/proc/buddyinfo");
  std::string line;
  uint64_t total = 0;
  while (std::getline(f, line)) {
    const auto at = line.find("zone");
    if (at == std::string::npos) continue;
    std::istringstream in(line.substr(at + 4));
    std::string zone;
    in >> zone;
    uint64_t count = 0;
    for (int k = 0; in >> count; ++k)
      if (k >= order) total += count << (k - order);
  }
  return total;
}

}  // namespace

void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const Policy policy = read_policy();
  if (policy.hint == Hint::kNever || bytes < int64_t(8 * policy.huge)) return;
  const uintptr_t huge = policy.huge;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(huge - 1);
  if (end <= begin) return;
  if (policy.hint == Hint::kWhileFree && free_huge_blocks(policy.order) < 2 * (end - begin) / huge) return;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace fsce::cpu
