// Vectors of kLanes floats on GCC/Clang vector extensions, and the math the
// kernels do on them. Included by a vec_*.h, which sets FSCE_CPU_LANES for its ISA
// (its translation unit is compiled for that ISA, see isa_kernels.h) and
// defines the 16-bit conversions declared here.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>

#define FSCE_VINLINE __attribute__((always_inline)) inline
// For lambdas whose body must be inlined into their caller.
#define FSCE_VINLINE_LAMBDA __attribute__((always_inline))

namespace fsce::cpu {
namespace {

constexpr int kLanes = FSCE_CPU_LANES;
typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vuint __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vbits16 __attribute__((vector_size(2 * kLanes)));

FSCE_VINLINE vfloat splat(float v) { return vfloat{} + v; }

FSCE_VINLINE vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

FSCE_VINLINE vfloat as_float(vuint u) {
  vfloat f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

FSCE_VINLINE vuint as_uint(vfloat f) {
  vuint u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// 2^x for the callers' arguments, which are <= 0 (logits minus a running
// max or minus the lse). A degree-5 minimax polynomial on the reduced argument
// in [-0.5, 0.5] (relative error below 2e-7); below -126 the result is about
// 1e-38 rather than 0; nan stays nan.
FSCE_VINLINE vfloat exp2v(vfloat x) {
  x = x < -126.f ? splat(-126.f) : x;
  // Adding 1.5 * 2^23 rounds x to an integer n; the + 127 leaves the biased
  // exponent n + 127 in the low bits, ready to shift into place.
  const float magic = 12582912.f + 127.f;
  const vfloat t = x + magic;
  const vfloat f = x - (t - magic);
  vfloat poly = splat(1.3264574808999896e-03f);
  poly = poly * f + 9.6715157851576805e-03f;
  poly = poly * f + 5.5507343262434006e-02f;
  poly = poly * f + 2.4022242426872253e-01f;
  poly = poly * f + 6.9314700365066528e-01f;
  poly = poly * f + 1.0f;
  return poly * as_float(as_uint(t) << 23);
}

// tanh(x) as x P(x^2) / Q(x^2), a (5, 3) rational fitted to minimise the
// maximum absolute error on [0, 9] (about 7e-8 in exact arithmetic, 4e-7
// evaluated in float); |x| is clamped at 9, where tanh rounds to 1 in float.
// One division and ten FMAs, against an exp2v, two adds and a division for
// (1 - e) / (1 + e), which also loses relative accuracy near 0. nan stays nan.
FSCE_VINLINE vfloat tanhv(vfloat x) {
  x = x > 9.f ? splat(9.f) : x;
  x = x < -9.f ? splat(-9.f) : x;
  const vfloat x2 = x * x;
  vfloat p = splat(1.6579260533888807e-11f);
  p = p * x2 - 1.2074286459551331e-08f;
  p = p * x2 + 9.0152580014546400e-06f;
  p = p * x2 + 2.8917212039232254e-03f;
  p = p * x2 + 1.2891604006290436e-01f;
  p = p * x2 + 9.9999964237213130e-01f;
  vfloat q = splat(2.2417266154661775e-04f);
  q = q * x2 + 2.3642519488930702e-02f;
  q = q * x2 + 4.6224805712699890e-01f;
  q = q * x2 + 1.0f;
  return p * x / q;
}

// Loads and stores of kLanes elements, converting to and from float.
FSCE_VINLINE vfloat loadv(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

FSCE_VINLINE vfloat loadv(const c10::BFloat16* p) {
  vbits16 b;
  std::memcpy(&b, p, sizeof b);
  return as_float(__builtin_convertvector(b, vuint) << 16);
}

// Defined by the ISA's vec_*.h (hardware conversions where it has them).
FSCE_VINLINE vfloat loadv(const c10::Half* p);
FSCE_VINLINE void storev(c10::Half* p, vfloat v);
FSCE_VINLINE void storev(c10::BFloat16* p, vfloat v);

FSCE_VINLINE void storev(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

// Rounds to nearest even, keeping nan a quiet nan: c10::BFloat16's rounding.
FSCE_VINLINE void store_bf16_rne(c10::BFloat16* p, vfloat v) {
  vuint u = as_uint(v);
  vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  rounded = v != v ? vuint{} + 0x7fc0u : rounded;
  vbits16 b = __builtin_convertvector(rounded, vbits16);
  std::memcpy(p, &b, sizeof b);
}

// c10::Half's conversions, a lane at a time.
FSCE_VINLINE vfloat load_half_scalar(const c10::Half* p) {
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}

FSCE_VINLINE void store_half_scalar(c10::Half* p, vfloat v) {
  for (int i = 0; i < kLanes; ++i) p[i] = c10::Half(v[i]);
}

// Partial chunks go through a padded buffer, so that the vector code never
// reads or writes past the row.
template <typename T>
FSCE_VINLINE vfloat load_partial(const T* p, int count, float pad) {
  T tmp[kLanes];
  for (int i = 0; i < kLanes; ++i) tmp[i] = i < count ? p[i] : T(pad);
  return loadv(tmp);
}

template <typename T>
FSCE_VINLINE void store_partial(T* p, vfloat v, int count) {
  T tmp[kLanes];
  storev(tmp, v);
  for (int i = 0; i < count; ++i) p[i] = tmp[i];
}

FSCE_VINLINE float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

FSCE_VINLINE float hsum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

FSCE_VINLINE vint lane_ids() {
  vint v;
  for (int i = 0; i < kLanes; ++i) v[i] = i;
  return v;
}

}  // namespace
}  // namespace fsce::cpu
