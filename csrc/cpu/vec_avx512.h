// The AVX-512 vectors: 16 lanes, fp16 through vcvtph2ps/vcvtps2ph on zmm,
// and bf16 stores through vcvtneps2bf16 where the translation unit enables
// AVX512-BF16.
#pragma once
#include <immintrin.h>

#define FSCE_CPU_LANES 16
#include "simd.h"

namespace fsce::cpu {
namespace {

// vcvtph2ps is exact, as c10::Half's conversion is.
FSCE_VINLINE vfloat loadv(const c10::Half* p) {
  // The maskz forms, all lanes on: the plain ones start from an undefined
  // vector, which GCC 12 reports as used uninitialised.
  return reinterpret_cast<vfloat>(_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}

// vcvtps2ph rounds to nearest even as c10::Half does, denormals included, but
// keeps a nan's payload where c10 writes 0x7e00: a vector with a nan takes
// c10's conversion (the rest match c10 for every float, checked exhaustively).
FSCE_VINLINE void storev(c10::Half* p, vfloat v) {
  const __m512 x = reinterpret_cast<__m512>(v);
  if (_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q)) return store_half_scalar(p, v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtps_ph(0xffff, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// vcvtneps2bf16 rounds to nearest even, but flushes denormals to zero and
// keeps a nan's payload, where c10::BFloat16 keeps denormals and writes
// 0x7fc0: a vector with either (vfpclassps: qnan 0x01, denormal 0x20, snan
// 0x80) takes the integer rounding (the rest match c10 for every float).
FSCE_VINLINE void storev(c10::BFloat16* p, vfloat v) {
#if defined(__AVX512BF16__)
  const __m512 x = reinterpret_cast<__m512>(v);
  if (!_mm512_fpclass_ps_mask(x, 0xa1)) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
    return;
  }
#endif
  store_bf16_rne(p, v);
}

}  // namespace
}  // namespace fsce::cpu
