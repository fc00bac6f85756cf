// The baseline (SSE2) vectors: 8 lanes, as two 128-bit registers; 16-bit
// conversions in software.
#pragma once

// Without AVX a 32-byte vector crosses calls in memory, which GCC warns of
// (-Wpsabi) for every function that returns one; these are all inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#define FSCE_CPU_LANES 8
#include "simd.h"

namespace fsce::cpu {
namespace {

FSCE_VINLINE vfloat loadv(const c10::Half* p) { return load_half_scalar(p); }
FSCE_VINLINE void storev(c10::Half* p, vfloat v) { store_half_scalar(p, v); }
FSCE_VINLINE void storev(c10::BFloat16* p, vfloat v) { store_bf16_rne(p, v); }

}  // namespace
}  // namespace fsce::cpu
