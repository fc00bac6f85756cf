// Picks the CPU kernels at run time: the widest ISA this CPU runs, or the one
// FSCE_CPU_ISA names (so that tests can run every path the machine has).
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "isa.h"

namespace fsce::cpu {
namespace {

const IsaKernels kBaseline{"baseline", &baseline::f32, &baseline::bf16, &baseline::f16, &baseline::f64};
#if FSCE_CPU_X86_ISAS
const IsaKernels kAvx2{"avx2", &avx2::f32, &avx2::bf16, &avx2::f16, &avx2::f64};
const IsaKernels kAvx512{"avx512", &avx512::f32, &avx512::bf16, &avx512::f16, &avx512::f64};
const IsaKernels kAvx512Bf16{"avx512-bf16", &avx512::f32, &avx512_bf16::bf16, &avx512::f16, &avx512::f64};
#endif

// The ISAs this CPU (and its OS) runs, widest first.
std::vector<const IsaKernels*> supported() {
  std::vector<const IsaKernels*> isas;
#if FSCE_CPU_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) {
    if (__builtin_cpu_supports("avx512bf16")) isas.push_back(&kAvx512Bf16);
    isas.push_back(&kAvx512);
  }
  if (__builtin_cpu_supports("x86-64-v3")) isas.push_back(&kAvx2);
#endif
  isas.push_back(&kBaseline);
  return isas;
}

const IsaKernels& choose(const char* wanted) {
  static const std::vector<const IsaKernels*> isas = supported();
  if (wanted == nullptr || *wanted == '\0') return *isas.front();
  std::string names;
  for (const IsaKernels* isa : isas) {
    if (std::strcmp(isa->name, wanted) == 0) return *isa;
    names += names.empty() ? isa->name : std::string(", ") + isa->name;
  }
  TORCH_CHECK(false, "FSCE_CPU_ISA=", wanted, " is not a kernel set this CPU runs; it runs: ", names);
}

}  // namespace

const IsaKernels& active_isa() {
  // Read at every launch (a getenv), so that a test can switch paths.
  return choose(std::getenv("FSCE_CPU_ISA"));
}

}  // namespace fsce::cpu
