// The per-row phases: a row's context (target, pointers, coefficients), its
// statistics pass, its loss, its gradient pass, and process_row, which runs
// one phase of one row over a walker.
#pragma once
#include "../params.h"
#include "walkers.cuh"

namespace fsce::cuda {
// Included by kernels.cu alone (one translation unit): internal linkage.
namespace {

enum Phase : int { kForward = 0, kForwardInplace = 1, kBackward = 2 };

// One row's target, pointers and per-class coefficient. `active` is false for
// the padding threads of a group past the last row: they only join reductions.
template <typename T, int TR>
struct RowContext {
  using acc_t = typename AccOf<T>::type;
  LogitTransform<TR, acc_t> tr;
  RowTarget<acc_t> tgt;
  const T* z;
  const T* t;          // probability target in the logits' dtype, or
  const acc_t* t_acc;  // in the accumulation type (see CEParams), or neither
  const acc_t* w;  // class weights in the accumulation type
  T* g_out;
  int64_t step;
  acc_t eps, inv_c;
  int mode;
  bool active, skip, empty;

  __device__ __forceinline__ RowContext(const CEParams& p, int64_t r, bool is_active) {
    const int64_t row = is_active ? r : 0;
    tr = logit_transform<TR, acc_t>(p);
    w = static_cast<const acc_t*>(p.weight);
    tgt = row_target<acc_t>(p, row);
    const RowOffsets off = row_offsets(p, row);
    z = static_cast<const T*>(p.logits) + off.logits;
    t = p.target_prob && !p.target_prob_acc ? static_cast<const T*>(p.target_prob) + off.target : nullptr;
    t_acc = p.target_prob && p.target_prob_acc ? static_cast<const acc_t*>(p.target_prob) + off.target
                                               : nullptr;
    g_out = p.grad ? static_cast<T*>(p.grad) + off.grad : nullptr;
    step = p.inner;
    eps = static_cast<acc_t>(p.label_smoothing);
    inv_c = acc_t(1) / static_cast<acc_t>(p.total_classes);
    mode = row_mode(p.target_prob != nullptr, tgt);
    active = is_active;
    skip = !is_active || tgt.ignored || tgt.invalid;
    empty = p.classes == 0;  // a shard without classes: lse = -inf, as on the CPU
  }

  // t_j .. t_{j+N-1} of a probability target, and a_j .. a_{j+N-1} (w_j
  // for index targets), each array read with vector loads where it can be.
  template <int N>
  __device__ __forceinline__ Values<acc_t, N> targets(int64_t j) const {
    return t_acc ? load_values<N>(t_acc + j * step, step) : load_values<N>(t + j * step, step);
  }
  template <int N>
  __device__ __forceinline__ Values<acc_t, N> coefs(int64_t j) const {
    Values<acc_t, N> a;
    if (w) {
      a = load_values<N>(w + j, 1);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) a.x[k] = 1;
    }
    if (mode != kProb) return a;
    const Values<acc_t, N> tj = targets<N>(j);
#pragma unroll
    for (int k = 0; k < N; ++k) a.x[k] = prob_coef<acc_t>(tj.x[k], a.x[k], eps, inv_c);
    return a;
  }
  __device__ __forceinline__ acc_t coef(int64_t j) const { return coefs<1>(j).x[0]; }

  // Read before any thread of the row writes (the in-place phase overwrites z).
  __device__ __forceinline__ acc_t pivot() const {
    return skip || empty ? acc_t(0) : finite_or_zero(tr.value(to_acc(z[0])));
  }
  __device__ __forceinline__ bool has_y() const { return !skip && tgt.y >= 0; }
  // z_y as stored (before the transform), 0 without a target column here.
  __device__ __forceinline__ acc_t z_y() const { return has_y() ? to_acc(z[tgt.y * step]) : acc_t(0); }
  __device__ __forceinline__ acc_t v_y() const { return has_y() ? tr.value(z_y()) : acc_t(0); }
  __device__ __forceinline__ acc_t fill() const { return tgt.ignored ? acc_t(0) : quiet_nan<acc_t>(); }
};

// Loads in flight per thread in a row pass, and their bytes: plain rows
// keep two 16-byte loads in flight (one for float64, whose exp is long);
// rows with coefficients (weights, smoothing, probabilities) read a weight
// or target per element and take one 8-byte load at a time, so that their
// loops do not spill.
template <typename T, bool GENERAL>
constexpr int unroll_of() {
  return GENERAL || sizeof(T) == 8 ? 1 : 2;
}
template <bool GENERAL>
constexpr int vec_bytes_of() {
  return GENERAL ? 8 : 16;
}

// This thread's share of the row's online-softmax state (not yet reduced).
// GENERAL: the row's mode is not kPlain (a loop of its own, so that plain
// rows pay nothing for coefficients).
template <bool STATS, bool GENERAL, typename T, int TR, typename Walker>
__device__ __forceinline__ Partial<typename AccOf<T>::type> row_pass(
    const RowContext<T, TR>& row, const Walker& walk, typename AccOf<T>::type pivot) {
  using acc_t = typename AccOf<T>::type;
  Partial<acc_t> part = empty_partial<acc_t>();
  walk.template each<unroll_of<T, GENERAL>(), vec_bytes_of<GENERAL>()>(row.z, [&](int64_t j, const auto& x) {
    constexpr int N = std::remove_reference_t<decltype(x)>::size;
    acc_t v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = row.tr.value(x.x[k]);
    absorb<STATS>(part, v, j);
    if constexpr (GENERAL) {
      const Values<acc_t, N> a = row.template coefs<N>(j);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        part.sa += a.x[k];
        part.saz += a.x[k] * (v[k] - pivot);
      }
      if constexpr (STATS) {
        if (row.mode == kProb) {
          const Values<acc_t, N> t = row.template targets<N>(j);
#pragma unroll
          for (int k = 0; k < N; ++k)
            if (beats(t.x[k], part.t_max) || part.target_pred < 0) part.t_max = t.x[k], part.target_pred = j + k;
        }
      }
    }
  });
  return part;
}

template <bool STATS, typename T, int TR, typename Walker>
__device__ __forceinline__ Partial<typename AccOf<T>::type> row_partial(
    const RowContext<T, TR>& row, const Walker& walk, typename AccOf<T>::type pivot) {
  if (row.skip) return empty_partial<typename AccOf<T>::type>();
  if (row.mode == kPlain) return row_pass<STATS, false>(row, walk, pivot);
  return row_pass<STATS, true>(row, walk, pivot);
}

template <bool STATS, typename T, int TR>
__device__ __forceinline__ void write_loss(const CEParams& p, int64_t r, const RowContext<T, TR>& row,
                                           const Partial<typename AccOf<T>::type>& part,
                                           typename AccOf<T>::type pivot, typename AccOf<T>::type v_y) {
  using acc_t = typename AccOf<T>::type;
  const acc_t log_s = log(part.s);
  const acc_t loss = row.skip ? row.fill()
                              : row_loss(row.tgt, part.m, log_s, v_y, pivot,
                                         row_sum_a<acc_t>(p, row.mode, part.sa), part.saz);
  static_cast<acc_t*>(p.loss)[r] = loss;
  static_cast<double*>(p.lse)[r] = row.skip ? static_cast<double>(row.fill())
                                            : static_cast<double>(part.m) + static_cast<double>(log_s);
  if constexpr (STATS) {
    // A row of only -inf never updated its argmax: PyTorch's is 0.
    const bool none = row.skip || row.empty;
    p.pred[r] = none ? -1 : (part.pred < 0 ? 0 : part.pred) + p.class_offset;
    static_cast<acc_t*>(p.entropy)[r] = row.skip ? row.fill() : row_entropy(log_s, part.e, part.s);
    if (p.target_pred)
      p.target_pred[r] = none ? -1 : (part.target_pred < 0 ? 0 : part.target_pred) + p.class_offset;
  }
}

// gA * p_j (+ gH dH/dv_j with ENT) for z_j, with lse = hi + lo, and
// dvalue(z_j) in `slope`.
template <bool ENT, int TR, typename acc_t>
__device__ __forceinline__ acc_t softmax_grad(const LogitTransform<TR, acc_t>& tr, acc_t z, acc_t hi,
                                              acc_t lo, const GradCoefs<acc_t>& c, acc_t& slope) {
  const acc_t log_p = (tr.value_slope(z, slope) - hi) - lo, p = exp_acc(log_p);
  if constexpr (ENT) return c.gA * p + c.gH * entropy_grad(p, log_p, c.H);
  return c.gA * p;
}

// grad = dvalue * (gA p - gk a - [j == y] gy) over the walker's columns
// (row_math.h), with lse = hi + lo; GENERAL as in row_pass; ENT adds the
// entropy's gradient gH dH/dv (the backward of a differentiated entropy).
template <bool GENERAL, bool ENT, typename T, int TR, typename Walker>
__device__ __forceinline__ void grad_pass(const RowContext<T, TR>& row, const Walker& walk,
                                          typename AccOf<T>::type hi, typename AccOf<T>::type lo,
                                          const GradCoefs<typename AccOf<T>::type>& c) {
  using acc_t = typename AccOf<T>::type;
  const int64_t y = row.tgt.y;
  walk.template transform<unroll_of<T, GENERAL>(), vec_bytes_of<GENERAL>()>(row.z, row.g_out, [&](int64_t j, const auto& x) {
    constexpr int N = std::remove_reference_t<decltype(x)>::size;
    // The target's slot in these N columns, or -1 (one 64-bit test per vector).
    const int ky = static_cast<uint64_t>(y - j) < static_cast<uint64_t>(N) ? static_cast<int>(y - j) : -1;
    [[maybe_unused]] Values<acc_t, N> a;
    if constexpr (GENERAL) a = row.template coefs<N>(j);
    Values<acc_t, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      acc_t slope;
      acc_t d = softmax_grad<ENT>(row.tr, x.x[k], hi, lo, c, slope);
      if constexpr (GENERAL) d -= c.gk * a.x[k];
      if (k == ky) d -= c.gy;  // folded in fp32, before rounding to the output type
      out.x[k] = TR == kIdentity ? d : d * slope;
    }
    return out;
  });
}

// The entropy's upstream gradient and saved value for a row (zeros where
// the backward has none).
template <typename acc_t>
struct EntropySaved {
  acc_t grad, value;
};

template <bool ENT, typename T, int TR, typename Walker>
__device__ __forceinline__ void write_grad(const RowContext<T, TR>& row, const Walker& walk,
                                           typename AccOf<T>::type hi, typename AccOf<T>::type lo,
                                           typename AccOf<T>::type scale,
                                           typename AccOf<T>::type sum_a,
                                           typename AccOf<T>::type lse_grad,
                                           const EntropySaved<typename AccOf<T>::type>& ent) {
  using acc_t = typename AccOf<T>::type;
  if (!row.active) return;
  if (row.skip) {
    const acc_t fill = row.fill();
    walk.template transform<1, 16>(row.z, row.g_out, [&](int64_t, const auto& x) {
      Values<acc_t, std::remove_reference_t<decltype(x)>::size> out;
#pragma unroll
      for (int k = 0; k < out.size; ++k) out.x[k] = fill;
      return out;
    });
    return;
  }
  GradCoefs<acc_t> c = grad_coefs(row.tgt, sum_a, scale, lse_grad);
  c.gH = ent.grad;
  c.H = ent.value;
  if (row.mode == kPlain)
    grad_pass<false, ENT>(row, walk, hi, lo, c);
  else
    grad_pass<true, ENT>(row, walk, hi, lo, c);
}

// What the backward reads back for row r: the saved lse (as hi + lo), the
// upstream gradients of the loss and the lse, and with ENT the entropy's;
// zeros for a row that is skipped.
template <bool ENT, typename T, int TR>
__device__ __forceinline__ void load_saved(const CEParams& p, int64_t r, const RowContext<T, TR>& row,
                                           typename AccOf<T>::type& hi,
                                           typename AccOf<T>::type& lo,
                                           typename AccOf<T>::type& scale,
                                           typename AccOf<T>::type& lse_grad,
                                           EntropySaved<typename AccOf<T>::type>& ent) {
  using acc_t = typename AccOf<T>::type;
  hi = lo = scale = lse_grad = 0;
  ent = {0, 0};
  if (row.skip) return;
  if constexpr (ENT) ent = {static_cast<const acc_t*>(p.grad_entropy)[r], static_cast<const acc_t*>(p.entropy)[r]};
  split_lse(static_cast<const double*>(p.lse)[r], hi, lo);
  scale = static_cast<const acc_t*>(p.grad_output)[r * p.grad_output_stride];
  // The in-place forward's split gradient pass reads its scale here.
  if (p.row_weight) scale *= static_cast<const acc_t*>(p.row_weight)[r];
  if (p.grad_lse) lse_grad = static_cast<const acc_t*>(p.grad_lse)[r];
  if (p.lse_grad_scale) lse_grad = *static_cast<const acc_t*>(p.lse_grad_scale) * (hi + lo);
}

// The in-place forward's counterpart of load_saved, from row r's reduced
// partial: lse = m + log s (as hi + lo), the gradient's scale (times the
// row's token weight) and the lse gradient.
template <typename acc_t>
__device__ __forceinline__ void inplace_saved(const CEParams& p, int64_t r, const Partial<acc_t>& part, acc_t& hi,
                                              acc_t& lo, acc_t& scale, acc_t& lse_grad) {
  hi = part.m;
  lo = static_cast<acc_t>(log(part.s));
  scale = *static_cast<const acc_t*>(p.grad_scale);
  // A group's lanes past the last row run too (their writes are masked): no read for them.
  if (p.row_weight && r < p.rows) scale *= static_cast<const acc_t*>(p.row_weight)[r];
  lse_grad = p.lse_grad_scale ? *static_cast<const acc_t*>(p.lse_grad_scale) * (hi + lo) : acc_t(0);
}

// Everything one row does in one phase, with one walker covering the row.
// STATS: the forward's statistics; in the backward, the entropy's gradient.
template <typename T, int PHASE, int TR, bool STATS, typename Walker>
__device__ __forceinline__ void process_row(const CEParams& p, int64_t r, bool active,
                                            const Walker& walk) {
  using acc_t = typename AccOf<T>::type;
  const RowContext<T, TR> row(p, r, active);
  if constexpr (PHASE != kBackward) {
    const acc_t pivot = row.pivot(), v_y = row.v_y();
    const Partial<acc_t> part = walk.template reduce<STATS>(row_partial<STATS>(row, walk, pivot));
    if (active && walk.leader()) write_loss<STATS>(p, r, row, part, pivot, v_y);
    if constexpr (PHASE == kForwardInplace) {
      // The pivot and v_y reads above must land before this group's writes
      // to the same row; a warp's shuffles alone do not order memory.
      if constexpr (Walker::syncs_warp()) __syncwarp();
      acc_t hi, lo, scale, lse_grad;
      inplace_saved(p, r, part, hi, lo, scale, lse_grad);
      write_grad<false>(row, walk, hi, lo, scale, row_sum_a<acc_t>(p, row.mode, part.sa), lse_grad,
                        EntropySaved<acc_t>{0, 0});
    }
  } else {
    acc_t hi, lo, scale, lse_grad, sa = 0;
    EntropySaved<acc_t> ent;
    load_saved<STATS>(p, r, row, hi, lo, scale, lse_grad, ent);
    if (row.mode == kProb) {
      Partial<acc_t> part = empty_partial<acc_t>();
      if (!row.skip) walk.columns([&](int64_t j) { part.sa += row.coef(j); });
      sa = walk.template reduce<false>(part).sa;
    }
    write_grad<STATS>(row, walk, hi, lo, scale, row_sum_a<acc_t>(p, row.mode, sa), lse_grad, ent);
  }
}

}  // namespace
}  // namespace fsce::cuda
