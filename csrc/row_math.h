// Row-level algebra shared by the CPU and CUDA kernels (no ATen).
//
// Every variant of the loss is written as
//     loss = coef_y * (lse - z_y) + k * (sum_a * (lse - pivot) - sum_az)
// where a_j is a per-class coefficient:
//   class-index target: a_j = w_j,                       k = eps / C,
//                       coef_y = (1 - eps) * w_y          (k-term only if eps > 0)
//   probability target: a_j = w_j * ((1 - eps) t_j + eps / C),  k = 1, coef_y = 0
// sum_a = sum_j a_j, sum_az = sum_j a_j (z_j - pivot). The pivot (the row's
// first logit when finite) keeps sum_az small when all logits share a large
// offset. The gradient is then
//     dloss/dz_j = A * p_j - k * a_j - [j == y] * coef_y,   A = coef_y + k * sum_a.
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

// What a row's target says, decided once per row.
template <typename acc_t>
struct RowTarget {
  int64_t y;      // class index, or -1 (probability target, ignored, invalid)
  bool ignored;   // ignore_index row: zero loss and zero gradient
  bool invalid;   // index outside [0, C) and not ignore_index
  acc_t coef_y;   // (1 - eps) * w_y
  acc_t k;        // scale of the a_j terms
};

template <typename acc_t>
FSCE_HD RowTarget<acc_t> index_row_target(int64_t y, int64_t classes, int64_t ignore_index,
                                          acc_t w_y, acc_t eps) {
  RowTarget<acc_t> t;
  t.ignored = (y == ignore_index);
  t.invalid = !t.ignored && (y < 0 || y >= classes);
  t.y = (t.ignored || t.invalid) ? -1 : y;
  t.coef_y = (1 - eps) * w_y;
  t.k = eps / static_cast<acc_t>(classes);
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
  const bool in_range = y >= 0 && y < p.classes;
  const acc_t w_y = (p.weight && in_range) ? static_cast<const acc_t*>(p.weight)[y] : acc_t(1);
  return index_row_target<acc_t>(y, p.classes, p.ignore_index, w_y,
                                 static_cast<acc_t>(p.label_smoothing));
}

// Sum of the class weights (a device scalar), or C without weights.
template <typename acc_t>
FSCE_HD acc_t weight_total(const CEParams& p) {
  return p.weight_sum ? *static_cast<const acc_t*>(p.weight_sum) : static_cast<acc_t>(p.classes);
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
