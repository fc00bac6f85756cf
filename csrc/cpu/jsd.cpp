// Generalized JSD on the CPU: rows split across threads (at::parallel_for).
// float, bf16 and fp16 rows run on the 8-lane SIMD of simd.h, compiled per
// ISA: the log-sums (an online max and rescaled sum per lane), then the terms
// or the gradient, whose exp and log are vector polynomials (exp2v,
// log1p_unit); float64 rows take the scalar path of jsd_math.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../jsd_math.h"
#include "../row_math.h"  // AccOf
#include "huge_pages.h"
#include "isa.h"
#include "jsd_kernels.h"
#include "vec_baseline.h"

// The JSD rows take 8-lane vectors, compiled once per ISA by target_clones
// (the cross-entropy kernels' per-ISA translation units, isa.h, are for
// CEParams launches).
#if FSCE_CPU_X86_ISAS
#define FSCE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FSCE_CPU_CLONES
#endif

namespace fsce::cpu {
namespace {

template <typename acc_t>
struct MaxLogSum {
  acc_t max, log_sum;
};

// max and log sum exp(v - max) of v = z * inv_t over one row.
template <typename T, typename acc_t>
FSCE_VINLINE MaxLogSum<acc_t> max_log_sum_scalar(const T* z, int64_t C, acc_t inv_t) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < C; ++j) m = std::max(m, static_cast<acc_t>(z[j]) * inv_t);
  if (m == -std::numeric_limits<acc_t>::infinity()) return {m, m};  // no mass: every s_j is nan
  acc_t s = 0;
  for (int64_t j = 0; j < C; ++j) s += std::exp(static_cast<acc_t>(z[j]) * inv_t - m);
  return {m, std::log(s)};
}

template <typename T>
FSCE_VINLINE MaxLogSum<float> max_log_sum_vec(const T* z, int64_t C, float inv_t) {
  const float inf = std::numeric_limits<float>::infinity();
  vfloat m = splat(-inf), s = splat(0.f);
  const auto absorb = [&](vfloat v) FSCE_VINLINE_LAMBDA {
    const vfloat nm = vmax(m, v);
    // A lane that has seen only -inf shifts by 0: -inf - -inf would be nan.
    const vfloat shift = nm == -inf ? splat(0.f) : nm;
    s = s * exp2v((m - shift) * kLog2e) + exp2v((v - shift) * kLog2e);
    m = nm;
  };
  int64_t j = 0;
  for (; j + kLanes <= C; j += kLanes) absorb(loadv(z + j) * inv_t);
  if (j < C) absorb(load_partial(z + j, static_cast<int>(C - j), -inf) * inv_t);
  const float M = hmax(m);
  if (M == -inf) return {M, M};
  float S = 0.f;
  for (int i = 0; i < kLanes; ++i)
    if (m[i] != -inf) S += s[i] * std::exp(m[i] - M);
  return {M, std::log(S)};
}

template <typename T, typename acc_t>
FSCE_VINLINE MaxLogSum<acc_t> max_log_sum(const T* z, int64_t C, acc_t inv_t) {
  if constexpr (std::is_same_v<T, double>) {
    return max_log_sum_scalar(z, C, inv_t);
  } else {
    return max_log_sum_vec(z, C, inv_t);
  }
}

// ---------------------------------------------------------------- vectors
// jsd_math.h's terms and gradient on 8 lanes. A lane whose log-probability
// is -inf (a -inf logit, or the padding of a row's tail) adds 0: exp2v
// returns about 1e-38 there rather than 0, so the guard is on s and t.

FSCE_VINLINE vfloat expv(vfloat x) { return exp2v(x * kLog2e); }

// log(1 + u) for u in [0, 1]: 1 + u = 2^k (1 + f) with |f| <= 0.42, then
// log(1 + f) = 2 atanh(f / (2 + f)) by its series to the 9th power (relative
// error about 2e-9 before rounding).
FSCE_VINLINE vfloat log1p_unit(vfloat u) {
  const auto big = u > 0.41421356f;
  const vfloat f = big ? (u - 1.f) * 0.5f : u;
  const vfloat k = big ? splat(0.69314718f) : splat(0.f);
  const vfloat s = f / (f + 2.f);
  const vfloat s2 = s * s;
  return k + 2.f * s * (1.f + s2 * (1.f / 3 + s2 * (1.f / 5 + s2 * (1.f / 7 + s2 * (1.f / 9)))));
}

FSCE_VINLINE vfloat mixture_log_v(vfloat s, vfloat t, const JsdCoefs<float>& c) {
  const vfloat a = s + c.log_1m_beta, b = t + c.log_beta;
  const vfloat hi = vmax(a, b), lo = a > b ? b : a;
  return hi + log1p_unit(expv(lo - hi));
}

template <int FORM>
FSCE_VINLINE void terms_v(vfloat s, vfloat t, const JsdCoefs<float>& c, vfloat& loss, vfloat& x) {
  const float inf = std::numeric_limits<float>::infinity();
  const vfloat zero = splat(0.f);
  if constexpr (FORM == kForwardKL) {
    loss = t == -inf ? zero : expv(t) * (t - s);
    x = zero;
  } else if constexpr (FORM == kReverseKL) {
    loss = x = s == -inf ? zero : expv(s) * (s - t);
  } else {
    const vfloat m = mixture_log_v(s, t, c);
    const vfloat kt = t == -inf ? zero : expv(t) * (t - m);
    x = s == -inf ? zero : expv(s) * (s - m);
    loss = c.beta * kt + (1.f - c.beta) * x;
  }
}

template <int FORM>
FSCE_VINLINE vfloat grad_v(vfloat s, vfloat t, float x, const JsdCoefs<float>& c) {
  const float inf = std::numeric_limits<float>::infinity();
  const vfloat p = s == -inf ? splat(0.f) : expv(s);
  if constexpr (FORM == kForwardKL) {
    return p - (t == -inf ? splat(0.f) : expv(t));
  } else if constexpr (FORM == kReverseKL) {
    return s == -inf ? splat(0.f) : p * (s - t - x);
  } else {
    return s == -inf ? splat(0.f) : (1.f - c.beta) * p * (s - mixture_log_v(s, t, c) - x);
  }
}

// Row r's log-probabilities at columns j .. j + count - 1 (count <= kLanes;
// the lanes past count are -inf).
template <typename T>
FSCE_VINLINE void log_probs_v(const T* zs, const T* zt, int64_t j, int64_t C, const RowStats<float>& st,
                              float inv_t, vfloat& s, vfloat& t) {
  const float inf = std::numeric_limits<float>::infinity();
  const bool full = j + kLanes <= C;
  const vfloat vs = full ? loadv(zs + j) : load_partial(zs + j, static_cast<int>(C - j), -inf);
  const vfloat vt = full ? loadv(zt + j) : load_partial(zt + j, static_cast<int>(C - j), -inf);
  s = (vs * inv_t - st.s_max) - st.s_log_sum;
  t = (vt * inv_t - st.t_max) - st.t_log_sum;
}

template <typename T, int FORM>
FSCE_VINLINE void forward_row_v(const T* zs, const T* zt, int64_t C, const JsdCoefs<float>& c, RowStats<float>& st,
                                float& loss) {
  // Lanes sum blocks of kBlock columns, the blocks add up in double: X
  // feeds every gradient element, and a float running sum over 1e5 classes
  // would lose digits.
  constexpr int64_t kBlock = 64 * kLanes;
  double loss_sum = 0, x_sum = 0;
  for (int64_t start = 0; start < C; start += kBlock) {
    const int64_t stop = std::min(C, start + kBlock);
    vfloat loss_acc = splat(0.f), x_acc = splat(0.f);
    for (int64_t j = start; j < stop; j += kLanes) {
      vfloat s, t, l, x;
      log_probs_v(zs, zt, j, C, st, c.inv_t, s, t);
      terms_v<FORM>(s, t, c, l, x);
      loss_acc += l;
      x_acc += x;
    }
    loss_sum += hsum(loss_acc);
    x_sum += hsum(x_acc);
  }
  st.x = static_cast<float>(x_sum);
  loss = jsd_row_loss<FORM>(static_cast<float>(loss_sum), st.x);
}

template <typename T, int FORM>
FSCE_VINLINE void backward_row_v(const T* zs, const T* zt, T* g, int64_t C, const JsdCoefs<float>& c,
                                 const RowStats<float>& st, float k) {
  for (int64_t j = 0; j < C; j += kLanes) {
    vfloat s, t;
    log_probs_v(zs, zt, j, C, st, c.inv_t, s, t);
    const vfloat d = k * grad_v<FORM>(s, t, st.x, c);
    if (j + kLanes <= C) {
      storev(g + j, d);
    } else {
      store_partial(g + j, d, static_cast<int>(C - j));
    }
  }
}

// ------------------------------------------------------------------- rows

int64_t row_grain(const JsdParams& p) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(p.classes, 1)); }

bool ignored(const JsdParams& p, int64_t r) { return p.labels && p.labels[r] == p.ignore_index; }

template <typename T, int FORM>
FSCE_VINLINE void forward_rows(const JsdParams& p, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  const JsdCoefs<acc_t> c = jsd_coefs<acc_t>(p);
  auto* loss = static_cast<acc_t*>(p.loss);
  auto* stats = static_cast<RowStats<acc_t>*>(p.row_stats);
  for (int64_t r = begin; r < end; ++r) {
    if (ignored(p, r)) {
      loss[r] = 0;
      stats[r] = {0, 0, 0, 0, 0};
      continue;
    }
    const T* zs = static_cast<const T*>(p.student) + r * p.student_stride;
    const T* zt = static_cast<const T*>(p.teacher) + r * p.teacher_stride;
    const MaxLogSum<acc_t> a = max_log_sum(zs, p.classes, c.inv_t);
    const MaxLogSum<acc_t> b = max_log_sum(zt, p.classes, c.inv_t);
    RowStats<acc_t> st{a.max, a.log_sum, b.max, b.log_sum, 0};
    if constexpr (std::is_same_v<T, double>) {
      acc_t loss_sum = 0;
      for (int64_t j = 0; j < p.classes; ++j) {
        const acc_t s = (zs[j] * c.inv_t - st.s_max) - st.s_log_sum;
        const acc_t t = (zt[j] * c.inv_t - st.t_max) - st.t_log_sum;
        acc_t l, x;
        jsd_terms<FORM>(s, t, c, l, x);
        loss_sum += l;
        st.x += x;
      }
      loss[r] = jsd_row_loss<FORM>(loss_sum, st.x);
    } else {
      forward_row_v<T, FORM>(zs, zt, p.classes, c, st, loss[r]);
    }
    stats[r] = st;
  }
}

template <typename T, int FORM>
FSCE_VINLINE void backward_rows(const JsdParams& p, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  const JsdCoefs<acc_t> c = jsd_coefs<acc_t>(p);
  const auto* stats = static_cast<const RowStats<acc_t>*>(p.row_stats);
  const auto* go = static_cast<const acc_t*>(p.grad_output);
  for (int64_t r = begin; r < end; ++r) {
    T* g = static_cast<T*>(p.grad) + r * p.grad_stride;
    if (ignored(p, r)) {
      std::fill(g, g + p.classes, T(0));
      continue;
    }
    const T* zs = static_cast<const T*>(p.student) + r * p.student_stride;
    const T* zt = static_cast<const T*>(p.teacher) + r * p.teacher_stride;
    const RowStats<acc_t> st = stats[r];
    const acc_t k = go[r * p.grad_output_stride] * c.inv_t;
    // g may be zs (in place): each element (vector) is read before it is written.
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t j = 0; j < p.classes; ++j) {
        const acc_t s = (zs[j] * c.inv_t - st.s_max) - st.s_log_sum;
        const acc_t t = (zt[j] * c.inv_t - st.t_max) - st.t_log_sum;
        g[j] = k * jsd_grad<FORM>(s, t, st.x, c);
      }
    } else {
      backward_row_v<T, FORM>(zs, zt, g, p.classes, c, st, k);
    }
  }
}

template <typename T, bool FORWARD, int FORM>
FSCE_VINLINE void rows(const JsdParams& p, int64_t b, int64_t e) {
  if constexpr (FORWARD) {
    forward_rows<T, FORM>(p, b, e);
  } else {
    backward_rows<T, FORM>(p, b, e);
  }
}

// Rows [b, e) in the launch's form.
template <typename T, bool FORWARD>
FSCE_VINLINE void rows_any(const JsdParams& p, int64_t b, int64_t e) {
  switch (jsd_form(p.beta)) {
    case kForwardKL: return rows<T, FORWARD, kForwardKL>(p, b, e);
    case kReverseKL: return rows<T, FORWARD, kReverseKL>(p, b, e);
    default: return rows<T, FORWARD, kMixture>(p, b, e);
  }
}

// One clone per ISA (simd.h) for the vector dtypes, each a plain function.
FSCE_CPU_CLONES void forward_f32(const JsdParams& p, int64_t b, int64_t e) { rows_any<float, true>(p, b, e); }
FSCE_CPU_CLONES void forward_bf16(const JsdParams& p, int64_t b, int64_t e) { rows_any<c10::BFloat16, true>(p, b, e); }
FSCE_CPU_CLONES void forward_f16(const JsdParams& p, int64_t b, int64_t e) { rows_any<c10::Half, true>(p, b, e); }
void forward_f64(const JsdParams& p, int64_t b, int64_t e) { rows_any<double, true>(p, b, e); }
FSCE_CPU_CLONES void backward_f32(const JsdParams& p, int64_t b, int64_t e) { rows_any<float, false>(p, b, e); }
FSCE_CPU_CLONES void backward_bf16(const JsdParams& p, int64_t b, int64_t e) { rows_any<c10::BFloat16, false>(p, b, e); }
FSCE_CPU_CLONES void backward_f16(const JsdParams& p, int64_t b, int64_t e) { rows_any<c10::Half, false>(p, b, e); }
void backward_f64(const JsdParams& p, int64_t b, int64_t e) { rows_any<double, false>(p, b, e); }

using RowsFn = void (*)(const JsdParams&, int64_t, int64_t);

void run_rows(const JsdParams& p, RowsFn f32, RowsFn bf16, RowsFn f16, RowsFn f64) {
  const RowsFn f = p.dtype == DType::Float32    ? f32
                   : p.dtype == DType::BFloat16 ? bf16
                   : p.dtype == DType::Float16  ? f16
                                                : f64;
  at::parallel_for(0, p.rows, row_grain(p), [&](int64_t b, int64_t e) { f(p, b, e); });
}

}  // namespace

void jsd_forward(const JsdParams& p) { run_rows(p, forward_f32, forward_bf16, forward_f16, forward_f64); }

void jsd_backward(const JsdParams& p) {
  const int64_t element = p.dtype == DType::Float64 ? 8 : p.dtype == DType::Float32 ? 4 : 2;
  if (p.grad != p.student) advise_huge_pages(p.grad, p.rows * p.grad_stride * element);
  run_rows(p, backward_f32, backward_bf16, backward_f16, backward_f64);
}

}  // namespace fsce::cpu
