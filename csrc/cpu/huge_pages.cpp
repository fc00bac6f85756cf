// See huge_pages.h for the policy.
#include "huge_pages.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace fsce::cpu {
namespace {

// The selected (bracketed) word of /sys/kernel/mm/transparent_hugepage/<name>,
// or "" where it cannot be read (not Linux, or no THP).
std::string thp_setting(const char* name) {
  std::ifstream f(std::string("/sys/kernel/mm/transparent_hugepage/") + name);
  std::string line;
  std::getline(f, line);
  const auto open = line.find('['), close = line.find(']');
  return open == std::string::npos || close == std::string::npos || close < open
             ? std::string()
             : line.substr(open + 1, close - open - 1);
}

bool hint_wanted() {
  const char* forced = std::getenv("FSCE_HUGE_PAGES");
  if (forced && *forced && std::strcmp(forced, "auto") != 0) return std::strcmp(forced, "0") != 0;
  const std::string defrag = thp_setting("defrag");
  return thp_setting("enabled") == "madvise" && (defrag == "defer" || defrag == "never");
}

}  // namespace

void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool wanted = hint_wanted();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!wanted || bytes < int64_t(8 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace fsce::cpu
