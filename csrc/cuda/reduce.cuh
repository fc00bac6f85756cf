// Conversions to and from the accumulation type, and the online-softmax
// state (Partial) with its merge, absorb and warp shuffle: the arithmetic
// every kernel shares.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../row_math.h"

namespace fsce::cuda {
// Included by kernels.cu alone (one translation unit): internal linkage.
namespace {

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

// ex2.approx.ftz: exp2f without its fix-up for denormal results (below
// 1.2e-38, which a softmax term may round to 0); the same 2-ulp accuracy.
__device__ __forceinline__ float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * kLog2e));
  return y;
#else  // the CPU emulation (tools/cuda_emu)
  return exp2f(x * kLog2e);
#endif
}
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -INFINITY;
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
}

// A partial online-softmax state over v: max, sum of exp(v - max), the a_j
// sums, and (statistics only) the entropy sum e of row_math.h against the
// same max and the first argmax of v and of a probability target, -1 while
// none has been seen.
template <typename acc_t>
struct Partial {
  acc_t m, s, sa, saz, e;
  int64_t pred;
  acc_t t_max;
  int64_t target_pred;
};

template <typename acc_t>
__device__ __forceinline__ Partial<acc_t> empty_partial() {
  return {neg_inf<acc_t>(), 0, 0, 0, 0, -1, neg_inf<acc_t>(), -1};
}

// torch.argmax's order: nan above every number, so that the first nan wins.
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t x, acc_t y) {
  return x > y || (x != x && y == y);
}

// The first argmax of two halves: the larger value, the lower index on a tie.
template <typename acc_t>
__device__ __forceinline__ int64_t first_argmax(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  const bool tie = vb == va || (vb != vb && va != va);
  if (ia < 0 || (ib >= 0 && (beats(vb, va) || (tie && ib < ia)))) return ib;
  return ia;
}

template <bool STATS, typename acc_t>
__device__ __forceinline__ Partial<acc_t> merge(Partial<acc_t> a, Partial<acc_t> b) {
  // With statistics a nan max stays (it is the argmax); the sum is nan either way.
  const acc_t m = (STATS ? beats(a.m, b.m) : a.m > b.m) ? a.m : b.m;
  Partial<acc_t> out;
  out.m = m;
  // Both sides still at -inf: exp(-inf - -inf) would be nan.
  const bool none = m == neg_inf<acc_t>();
  const acc_t alpha_a = none ? acc_t(1) : exp_acc(a.m - m), alpha_b = none ? acc_t(1) : exp_acc(b.m - m);
  out.s = a.s * alpha_a + b.s * alpha_b;
  out.sa = a.sa + b.sa;
  out.saz = a.saz + b.saz;
  if constexpr (STATS) {
    out.e = rebase_entropy(a.e, a.s, alpha_a, a.m, m) + rebase_entropy(b.e, b.s, alpha_b, b.m, m);
    out.pred = first_argmax(a.m, a.pred, b.m, b.pred);
    out.t_max = beats(a.t_max, b.t_max) ? a.t_max : b.t_max;
    out.target_pred = first_argmax(a.t_max, a.target_pred, b.t_max, b.target_pred);
  } else {
    out.pred = out.target_pred = -1;
    out.t_max = out.e = 0;
  }
  return out;
}

// Absorbs v_j .. v_{j+N-1}. Without statistics: one rescale per N values
// (against their max), one exp per value. With them, value by value, so that
// the max update records the first argmax (a nan included, as torch.argmax).
template <bool STATS, int N, typename acc_t>
__device__ __forceinline__ void absorb(Partial<acc_t>& p, const acc_t (&v)[N], int64_t j) {
  if constexpr (STATS) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (v[k] > p.m || (v[k] != v[k] && p.m == p.m)) {
        const acc_t alpha = exp_acc(p.m - v[k]);
        p.e = rebase_entropy(p.e, p.s, alpha, p.m, v[k]);
        p.s *= alpha;
        p.m = v[k];
        p.pred = j + k;
      }
      if (v[k] != neg_inf<acc_t>()) {
        const acc_t ex = exp_acc(v[k] - p.m);
        p.s += ex;
        p.e += entropy_term(ex, v[k] - p.m);
      }
    }
  } else {
    acc_t cm = v[0];  // fmax skips nan: a nan reaches the sum below
#pragma unroll
    for (int k = 1; k < N; ++k) cm = max_acc(cm, v[k]);
    if (cm > p.m) {
      p.s *= exp_acc(p.m - cm);
      p.m = cm;
    }
    // While only -inf has been seen, shift by 0: exp(-inf - -inf) would be nan.
    const acc_t shift = p.m == neg_inf<acc_t>() ? acc_t(0) : p.m;
#pragma unroll
    for (int k = 0; k < N; ++k) p.s += exp_acc(v[k] - shift);
  }
}

template <bool STATS, typename acc_t>
__device__ __forceinline__ Partial<acc_t> shfl_xor(const Partial<acc_t>& p, int offset) {
  Partial<acc_t> o = p;
  o.m = __shfl_xor_sync(0xffffffffu, p.m, offset);
  o.s = __shfl_xor_sync(0xffffffffu, p.s, offset);
  o.sa = __shfl_xor_sync(0xffffffffu, p.sa, offset);
  o.saz = __shfl_xor_sync(0xffffffffu, p.saz, offset);
  if constexpr (STATS) {
    o.e = __shfl_xor_sync(0xffffffffu, p.e, offset);
    o.pred = __shfl_xor_sync(0xffffffffu, static_cast<long long>(p.pred), offset);
    o.t_max = __shfl_xor_sync(0xffffffffu, p.t_max, offset);
    o.target_pred = __shfl_xor_sync(0xffffffffu, static_cast<long long>(p.target_pred), offset);
  }
  return o;
}

}  // namespace
}  // namespace fsce::cuda
