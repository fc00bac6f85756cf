// Row-level algebra shared by the CPU and CUDA kernels (no ATen).
//
// The kernels see effective logits v_j = value(z_j) (LogitTransform: the
// logit scale, then the softcap), and every variant of the loss is written as
//     loss = coef_y * (lse - v_y) + k * (sum_a * (lse - pivot) - sum_az)
// where a_j is a per-class coefficient:
//   class-index target: a_j = w_j,                       k = eps / C,
//                       coef_y = (1 - eps) * w_y          (k-term only if eps > 0)
//   probability target: a_j = w_j * ((1 - eps) t_j + eps / C),  k = 1, coef_y = 0
// sum_a = sum_j a_j, sum_az = sum_j a_j (v_j - pivot), lse = log sum_j exp(v_j).
// The pivot (the row's first v when finite) keeps sum_az small when all
// logits share a large offset. With g the upstream gradient of the loss and
// h that of the lse (the z-loss, or a user's lse penalty), the gradient is
//     dloss/dz_j = dvalue(z_j) * (gA * p_j - gk * a_j - [j == y] * gy)
// with gA = g * (coef_y + k * sum_a) + h, gk = g * k, gy = g * coef_y
// (GradCoefs). C in eps / C is the total class count: with the classes
// sharded across processes (vocab parallel), a row's target may live in
// another shard ("absent" here: no coef_y term).
#pragma once
#include <cmath>
#include <cstdint>

#include "params.h"

#if defined(__CUDACC__)
#define FSCE_HD __host__ __device__ __forceinline__
#else
#define FSCE_HD inline
#endif

namespace fsce {

constexpr float kLog2e = 1.4426950408889634f;

// The accumulation type of a storage type: float, or double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Which a_j terms a row needs: none, smoothing over class weights, or a
// probability target.
enum Mode : int { kPlain = 0, kSmooth = 1, kProb = 2 };

// The logit transform: none, a scale, or a scale then a softcap.
enum Transform : int { kIdentity = 0, kScale = 1, kSoftcap = 2 };

FSCE_HD int transform_of(const CEParams& p) {
  return p.softcap > 0 ? kSoftcap : (p.logit_scale != 1.0 ? kScale : kIdentity);
}

// v = value(z) and its derivative, shared by the forward and the backward:
// v = scale * z, or cap * tanh(scale * z / cap) (Gemma 2's softcapping).
template <int TR, typename acc_t>
struct LogitTransform {
  acc_t scale, cap, inv_cap;

  FSCE_HD acc_t value(acc_t z) const {
    if constexpr (TR == kIdentity) return z;
    if constexpr (TR == kScale) return z * scale;
    using std::tanh;
    return cap * tanh(z * (scale * inv_cap));
  }

  // v, with dv/dz in `slope`.
  FSCE_HD acc_t value_slope(acc_t z, acc_t& slope) const {
    if constexpr (TR == kIdentity) {
      slope = 1;
      return z;
    }
    if constexpr (TR == kScale) {
      slope = scale;
      return z * scale;
    }
    using std::tanh;
    const acc_t t = tanh(z * (scale * inv_cap));
    slope = scale * (1 - t * t);
    return cap * t;
  }
};

template <int TR, typename acc_t>
FSCE_HD LogitTransform<TR, acc_t> logit_transform(const CEParams& p) {
  const acc_t cap = p.softcap > 0 ? static_cast<acc_t>(p.softcap) : acc_t(1);
  return {static_cast<acc_t>(p.logit_scale), cap, acc_t(1) / cap};
}

// What a row's target says, decided once per row.
template <typename acc_t>
struct RowTarget {
  int64_t y;      // class index, or -1 (probability target, ignored, invalid)
  bool ignored;   // ignore_index row: zero loss and zero gradient
  bool invalid;   // index outside [0, total classes) and not ignore_index
  acc_t coef_y;   // (1 - eps) * w_y
  acc_t k;        // scale of the a_j terms
};

// y is a global class index; this shard holds classes [offset, offset + classes).
template <typename acc_t>
FSCE_HD RowTarget<acc_t> index_row_target(int64_t y, int64_t offset, int64_t classes,
                                          int64_t total_classes, int64_t ignore_index, acc_t w_y,
                                          acc_t eps) {
  RowTarget<acc_t> t;
  t.ignored = (y == ignore_index);
  t.invalid = !t.ignored && (y < 0 || y >= total_classes);
  const bool here = !t.ignored && !t.invalid && y - offset >= 0 && y - offset < classes;
  t.y = here ? y - offset : -1;
  t.coef_y = here ? (1 - eps) * w_y : acc_t(0);
  t.k = eps / static_cast<acc_t>(total_classes);
  return t;
}

template <typename acc_t>
FSCE_HD RowTarget<acc_t> prob_row_target() {
  RowTarget<acc_t> t;
  t.y = -1;
  t.ignored = false;
  t.invalid = false;
  t.coef_y = 0;
  t.k = 1;
  return t;
}

// a_j for a probability target (t_j and w_j already in acc_t).
template <typename acc_t>
FSCE_HD acc_t prob_coef(acc_t t_j, acc_t w_j, acc_t eps, acc_t inv_classes) {
  return w_j * ((1 - eps) * t_j + eps * inv_classes);
}

// lse = m + log_s (m the row max). Differences are taken against m first, so
// that a loss of a few units stays exact when the logits are around 1e4.
// Which a_j terms the row's target needs (one place for both backends).
template <typename acc_t>
FSCE_HD int row_mode(bool prob_target, const RowTarget<acc_t>& t) {
  return prob_target ? kProb : (t.k != 0 ? kSmooth : kPlain);
}

// The per-row coefficients of the gradient (see the top of this file); gH
// and H are the entropy's upstream gradient and value, read only by the
// backward's entropy variant.
template <typename acc_t>
struct GradCoefs {
  acc_t gA, gk, gy, gH, H;
};

template <typename acc_t>
FSCE_HD GradCoefs<acc_t> grad_coefs(const RowTarget<acc_t>& t, acc_t sum_a, acc_t g, acc_t h) {
  return {g * (t.coef_y + t.k * sum_a) + h, g * t.k, g * t.coef_y, acc_t(0), acc_t(0)};
}

// The entropy H = -sum_j p_j log p_j of a row's softmax, accumulated beside
// s = sum_j exp(v_j - m) as e = sum_j exp(v_j - m) (v_j - m) against the same
// shift m: then H = log s - e / s. A term whose exp is 0 adds 0 (a -inf
// logit would make 0 * -inf).
template <typename acc_t>
FSCE_HD acc_t entropy_term(acc_t ex, acc_t d) {
  return ex == acc_t(0) ? acc_t(0) : ex * d;
}

// e of a partial state with shift m_old and sum s, moved to the shift m_new:
// alpha = exp(m_old - m_new) rescales it (as it does s), and every term's
// v - m gains m_old - m_new.
template <typename acc_t>
FSCE_HD acc_t rebase_entropy(acc_t e, acc_t s, acc_t alpha, acc_t m_old, acc_t m_new) {
  return s == acc_t(0) ? acc_t(0) : alpha * (e + s * (m_old - m_new));
}

template <typename acc_t>
FSCE_HD acc_t row_entropy(acc_t log_s, acc_t e, acc_t s) {
  return log_s - e / s;
}

// dH/dv_j = -p_j (log p_j + H), with log p_j = v_j - lse; 0 where p_j is.
template <typename acc_t>
FSCE_HD acc_t entropy_grad(acc_t p, acc_t log_p, acc_t H) {
  return p == acc_t(0) ? acc_t(0) : -p * (log_p + H);
}

template <typename acc_t>
FSCE_HD acc_t row_loss(const RowTarget<acc_t>& t, acc_t m, acc_t log_s, acc_t z_y, acc_t pivot,
                       acc_t sum_a, acc_t sum_az) {
  acc_t loss = 0;
  if (t.coef_y != 0 && t.y >= 0) loss = t.coef_y * ((m - z_y) + log_s);
  // The smoothing term is skipped at eps == 0, as PyTorch does, so that an
  // infinite logit elsewhere in the row cannot turn 0 * inf into nan.
  if (t.k != 0) loss += t.k * (sum_a * ((m - pivot) + log_s) - sum_az);
  return loss;
}

// Element offsets of row r = n * inner + s in the logits, the probability
// target and the gradient; element j of the row is j * inner further on.
struct RowOffsets {
  int64_t logits, target, grad;
};

FSCE_HD RowOffsets row_offsets(const CEParams& p, int64_t r) {
  const int64_t n = r / p.inner, s = r % p.inner;
  return {n * p.logits_outer_stride + s, n * p.target_outer_stride + s, n * p.grad_outer_stride + s};
}

// Reads row r's target (class weights are in acc_t, see CEParams::weight).
template <typename acc_t>
FSCE_HD RowTarget<acc_t> row_target(const CEParams& p, int64_t r) {
  if (p.target_index == nullptr) return prob_row_target<acc_t>();
  const int64_t y = p.target_index[r];
  const int64_t local = y - p.class_offset;
  const bool here = local >= 0 && local < p.classes;
  const acc_t w_y = (p.weight && here) ? static_cast<const acc_t*>(p.weight)[local] : acc_t(1);
  return index_row_target<acc_t>(y, p.class_offset, p.classes, p.total_classes, p.ignore_index,
                                 w_y, static_cast<acc_t>(p.label_smoothing));
}

// Sum of this shard's class weights (a device scalar), or its class count.
template <typename acc_t>
FSCE_HD acc_t weight_total(const CEParams& p) {
  return p.weight_sum ? *static_cast<const acc_t*>(p.weight_sum) : static_cast<acc_t>(p.classes);
}

// sum_a of the loss algebra for a row's mode, given the row's own sum over
// a_j (only probability rows need one).
template <typename acc_t>
FSCE_HD acc_t row_sum_a(const CEParams& p, int mode, acc_t reduced_sum_a) {
  return mode == kSmooth ? weight_total<acc_t>(p) : mode == kProb ? reduced_sum_a : acc_t(0);
}

// The saved float64 lse as two accumulation-type parts, so that
// (z - hi) - lo keeps z - lse exact for large logits.
template <typename acc_t>
FSCE_HD void split_lse(double lse, acc_t& hi, acc_t& lo) {
  hi = static_cast<acc_t>(lse);
  lo = static_cast<acc_t>(lse - static_cast<double>(hi));
}

template <typename acc_t>
FSCE_HD acc_t finite_or_zero(acc_t v) {
  return (v - v == 0) ? v : acc_t(0);  // false for inf and nan
}

}  // namespace fsce
