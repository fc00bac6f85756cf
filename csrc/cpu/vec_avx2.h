// The AVX2 vectors: 8 lanes, fp16 through F16C.
#pragma once
#include <immintrin.h>

#define FSCE_CPU_LANES 8
#include "simd.h"

namespace fsce::cpu {
namespace {

// vcvtph2ps is exact, as c10::Half's conversion is.
FSCE_VINLINE vfloat loadv(const c10::Half* p) {
  return reinterpret_cast<vfloat>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// vcvtps2ph rounds to nearest even as c10::Half does, denormals included, but
// keeps a nan's payload where c10 writes 0x7e00: a vector with a nan takes
// c10's conversion (the rest match c10 for every float, checked exhaustively).
FSCE_VINLINE void storev(c10::Half* p, vfloat v) {
  const __m256 x = reinterpret_cast<__m256>(v);
  if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) return store_half_scalar(p, v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

FSCE_VINLINE void storev(c10::BFloat16* p, vfloat v) { store_bf16_rne(p, v); }

}  // namespace
}  // namespace fsce::cpu
