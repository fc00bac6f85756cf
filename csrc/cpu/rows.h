// A CPU row and what a launch's rows share (Stats, Probs, Row, Recipe), a
// row's outputs, and the strided scalar path that float64 takes. Included
// after the ISA's vec_*.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../params.h"
#include "../row_math.h"
#include "simd.h"  // FSCE_VINLINE, vfloat

namespace fsce::cpu {
// Included by kernels.cpp alone (one translation unit): internal linkage.
namespace {

// A row's pass over v: max m, log_s = log sum exp(v - m), the a_j sums, and
// (with stats) the first argmax of v and of a probability target, and the
// entropy of the softmax.
template <typename acc_t>
struct Stats {
  acc_t m, log_s, sum_a, sum_az;
  int64_t pred, target_pred;
  acc_t entropy;
};

// A row's probability target, stored in the logits' dtype or, when the
// caller's dtype differed, in the accumulation type (see CEParams).
template <typename T>
struct Probs {
  using acc_t = typename AccOf<T>::type;
  const T* own;
  const acc_t* acc;

  explicit operator bool() const { return own || acc; }
  FSCE_VINLINE acc_t at(int64_t i) const { return acc ? acc[i] : static_cast<acc_t>(own[i]); }
  FSCE_VINLINE vfloat vec(int64_t j, int count) const {
    if (count == kLanes) return acc ? loadv(acc + j) : loadv(own + j);
    return acc ? load_partial(acc + j, count, 0.f) : load_partial(own + j, count, 0.f);
  }
};

// One row, resolved from the params: element j of the row is at [j * step].
template <typename T>
struct Row {
  const T* z;
  Probs<T> t;  // probability target, or empty
  T* g;        // gradient destination or nullptr
  int64_t step;
};

template <typename T>
FSCE_VINLINE Row<T> row_at(const CEParams& p, int64_t r) {
  using acc_t = typename AccOf<T>::type;
  const RowOffsets off = row_offsets(p, r);
  Row<T> row;
  row.z = static_cast<const T*>(p.logits) + off.logits;
  row.t = {nullptr, nullptr};
  if (p.target_prob && p.target_prob_acc)
    row.t.acc = static_cast<const acc_t*>(p.target_prob) + off.target;
  else if (p.target_prob)
    row.t.own = static_cast<const T*>(p.target_prob) + off.target;
  row.g = p.grad ? static_cast<T*>(p.grad) + off.grad : nullptr;
  row.step = p.inner;
  return row;
}

// What every row of a launch shares: the class weights, eps, 1/C, the
// transform, whether the argmax statistics are wanted, whether the values are
// bounded (see absorb_bounded), and the softcap's tanh table or nullptr (see
// fill_tanh_table).
template <typename acc_t, int TR>
struct Recipe {
  const acc_t* w;
  acc_t eps, inv_c;
  LogitTransform<TR, acc_t> tr;
  bool stats, bounded;
  const float* tanh_table;
};

// Softcapped values lie in [-cap, cap]; for cap <= 43, exp(v - cap) >=
// exp(-2 cap) is still a normal float.
constexpr double kMaxBoundedCap = 43.0;

template <typename acc_t, int TR>
FSCE_VINLINE Recipe<acc_t, TR> recipe_of(const CEParams& p, const float* tanh_table) {
  return {static_cast<const acc_t*>(p.weight), static_cast<acc_t>(p.label_smoothing),
          acc_t(1) / static_cast<acc_t>(p.total_classes), logit_transform<TR, acc_t>(p),
          p.pred != nullptr, TR == kSoftcap && p.softcap <= kMaxBoundedCap, tanh_table};
}

// ------------------------------------------------------------- row outputs

// What a forward writes per row (see CEParams), and the in-place gradient's
// scales (0 without one).
template <typename acc_t>
struct ForwardOut {
  acc_t* loss;
  double* lse;
  acc_t* entropy;
  const acc_t* row_weight;
  acc_t scale, lse_scale;
};

template <typename acc_t>
FSCE_VINLINE ForwardOut<acc_t> forward_out(const CEParams& p, bool write_grad) {
  const auto scalar = [&](const void* v) { return write_grad && v ? *static_cast<const acc_t*>(v) : acc_t(0); };
  return {static_cast<acc_t*>(p.loss), static_cast<double*>(p.lse), static_cast<acc_t*>(p.entropy),
          static_cast<const acc_t*>(p.row_weight), scalar(p.grad_scale), scalar(p.lse_grad_scale)};
}

// An ignored row's outputs (0), or an invalid one's (nan: an invalid index
// poisons its row rather than reading out of bounds). Returns the fill.
template <typename acc_t>
FSCE_VINLINE acc_t skip_row(const ForwardOut<acc_t>& out, const CEParams& p, int64_t r, const RowTarget<acc_t>& tgt) {
  const acc_t fill = tgt.ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
  out.loss[r] = fill;
  out.lse[r] = fill;
  if (p.pred) p.pred[r] = -1;
  if (p.target_pred) p.target_pred[r] = -1;
  if (out.entropy) out.entropy[r] = fill;
  return fill;
}

// Writes row r's outputs from its statistics; returns the coefficients of its
// in-place gradient. v_y: the target's value.
template <typename acc_t>
FSCE_VINLINE GradCoefs<acc_t> finish_row(const ForwardOut<acc_t>& out, const CEParams& p, int64_t r,
                                         const RowTarget<acc_t>& tgt, int mode, const Stats<acc_t>& st,
                                         acc_t pivot, acc_t v_y) {
  const acc_t sum_a = row_sum_a<acc_t>(p, mode, st.sum_a);
  out.loss[r] = row_loss(tgt, st.m, st.log_s, v_y, pivot, sum_a, st.sum_az);
  const double lse = static_cast<double>(st.m) + static_cast<double>(st.log_s);
  out.lse[r] = lse;
  if (p.pred) p.pred[r] = st.pred < 0 ? -1 : st.pred + p.class_offset;
  if (p.target_pred) p.target_pred[r] = st.target_pred < 0 ? -1 : st.target_pred + p.class_offset;
  if (out.entropy) out.entropy[r] = st.entropy;
  const acc_t row_scale = out.row_weight ? out.scale * out.row_weight[r] : out.scale;
  return grad_coefs(tgt, sum_a, row_scale, out.lse_scale * static_cast<acc_t>(lse));
}

// Row r's backward coefficients; row_sum: its own sum over a_j (probability
// targets only).
template <typename acc_t>
FSCE_VINLINE GradCoefs<acc_t> backward_coefs(const CEParams& p, int64_t r, const RowTarget<acc_t>& tgt, int mode,
                                             acc_t row_sum) {
  const auto* grad_lse = static_cast<const acc_t*>(p.grad_lse);
  const acc_t g = static_cast<const acc_t*>(p.grad_output)[r * p.grad_output_stride];
  GradCoefs<acc_t> c = grad_coefs(tgt, row_sum_a<acc_t>(p, mode, row_sum), g, grad_lse ? grad_lse[r] : acc_t(0));
  if (p.grad_entropy) {
    c.gH = static_cast<const acc_t*>(p.grad_entropy)[r];
    c.H = static_cast<const acc_t*>(p.entropy)[r];
  }
  return c;
}

// ---------------------------------------------------------------- scalar path

template <typename T, typename acc_t, int TR>
FSCE_VINLINE acc_t coef_scalar(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t j, int mode) {
  const acc_t wj = rc.w ? rc.w[j] : acc_t(1);
  if (mode != kProb) return wj;
  return prob_coef<acc_t>(row.t.at(j * row.step), wj, rc.eps, rc.inv_c);
}

template <typename T, typename acc_t, int TR>
FSCE_VINLINE Stats<acc_t> stats_scalar(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C,
                                       int mode, acc_t pivot) {
  acc_t m = -std::numeric_limits<acc_t>::infinity(), t_max = m;
  int64_t pred = C > 0 ? 0 : -1, target_pred = pred;
  for (int64_t j = 0; j < C; ++j) {
    const acc_t v = rc.tr.value(static_cast<acc_t>(row.z[j * row.step]));
    if (v > m || v != v) {
      if (m == m) pred = j;  // the first nan, or the first strict maximum
      m = v;
    }
    if (rc.stats && mode == kProb) {
      const acc_t t = row.t.at(j * row.step);
      if (t > t_max) t_max = t, target_pred = j;
    }
  }
  const acc_t shift = std::isinf(m) && m < 0 ? acc_t(0) : m;
  acc_t s = 0, sa = 0, saz = 0, e = 0;
  for (int64_t j = 0; j < C; ++j) {
    const acc_t v = rc.tr.value(static_cast<acc_t>(row.z[j * row.step]));
    const acc_t ex = std::exp(v - shift);
    s += ex;
    if (rc.stats) e += entropy_term(ex, v - shift);
    if (mode != kPlain) {
      const acc_t a = coef_scalar(row, rc, j, mode);
      sa += a;
      saz += a * (v - pivot);
    }
  }
  return {m, std::log(s), sa, saz, pred, target_pred, row_entropy(std::log(s), e, s)};
}

template <typename T, typename acc_t, int TR>
FSCE_VINLINE acc_t sum_coef_scalar(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C) {
  acc_t sa = 0;
  for (int64_t j = 0; j < C; ++j) sa += coef_scalar(row, rc, j, kProb);
  return sa;
}

// ENT: add the entropy's gradient (c.gH, c.H).
template <typename T, typename acc_t, int TR, bool ENT>
FSCE_VINLINE void grad_scalar(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C, int mode,
                              acc_t lse_hi, acc_t lse_lo, GradCoefs<acc_t> c, int64_t y) {
  for (int64_t j = 0; j < C; ++j) {
    acc_t slope;
    const acc_t v = rc.tr.value_slope(static_cast<acc_t>(row.z[j * row.step]), slope);
    const acc_t log_p = (v - lse_hi) - lse_lo, p = std::exp(log_p);
    acc_t d = c.gA * p;
    if constexpr (ENT) d += c.gH * entropy_grad(p, log_p, c.H);
    if (mode != kPlain) d -= c.gk * coef_scalar(row, rc, j, mode);
    if (j == y) d -= c.gy;
    row.g[j * row.step] = static_cast<T>(TR == kIdentity ? d : d * slope);
  }
}

}  // namespace
}  // namespace fsce::cpu
