// The CPU kernels compiled once per instruction set (kernels_<isa>.cpp), and
// the choice among them at run time (isa.cpp).
#pragma once
#include <cstdint>

#include "../params.h"

// The AVX2 and AVX-512 kernels are built with GCC on x86-64 (its target
// pragma); elsewhere the baseline alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FSCE_CPU_X86_ISAS 1
#else
#define FSCE_CPU_X86_ISAS 0
#endif

namespace fsce::cpu {

// Entries of the softcap's tanh table: one per 16-bit pattern.
constexpr int64_t kTanhTableSize = 65536;

// One dtype's row kernels for one ISA: rows [begin, end) of a launch.
struct DTypeKernels {
  // write_grad: the in-place mode (see forward in kernels.h).
  void (*forward)(const CEParams& p, int64_t begin, int64_t end, bool write_grad, const float* tanh_table);
  void (*backward)(const CEParams& p, int64_t begin, int64_t end, const float* tanh_table);
  // The softcap's tanh per 16-bit pattern (see fill_tanh_table); 16-bit dtypes only.
  void (*tanh_table)(const CEParams& p, float* table);
};

struct IsaKernels {
  const char* name;  // what cpu_isa() reports and FSCE_CPU_ISA names
  const DTypeKernels *f32, *bf16, *f16, *f64;

  const DTypeKernels& of(DType dtype) const {
    switch (dtype) {
      case DType::Float32: return *f32;
      case DType::BFloat16: return *bf16;
      case DType::Float16: return *f16;
      default: return *f64;
    }
  }
};

// Each kernels_<isa>.cpp defines its ISA's table (kernels_avx512_bf16.cpp its
// bf16 kernels only: the rest are AVX-512's).
namespace avx512 {
extern const DTypeKernels f32, bf16, f16, f64;
}
namespace avx512_bf16 {
extern const DTypeKernels bf16;
}
namespace avx2 {
extern const DTypeKernels f32, bf16, f16, f64;
}
namespace baseline {
extern const DTypeKernels f32, bf16, f16, f64;
}

// The fastest kernels this CPU runs, or those FSCE_CPU_ISA names (an error
// if this CPU cannot run them or the name is unknown).
const IsaKernels& active_isa();

}  // namespace fsce::cpu
