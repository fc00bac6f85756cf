// The row kernels of one ISA: the row dispatch (the SIMD paths for
// contiguous and spatial rows, the scalar path for float64), a launch's rows forward and
// backward, and isa.h's table of them. Included once by each kernels_<isa>.cpp,
// after its vec_<isa>.h and with its target pragma in force.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "isa.h"
#include "rows.h"
#include "rows_simd.h"
#include "rows_spatial.h"

namespace fsce::cpu {
namespace {

// ------------------------------------------------------------ row dispatch

template <typename T, int TR, bool ENT>
FSCE_VINLINE Stats<float> stats_vec_mode(const Row<T>& row, const Recipe<float, TR>& rc, int64_t C, int mode,
                                         float pivot, float* keep) {
  if (mode == kPlain) return stats_vec<T, kPlain, TR, ENT>(row.z, row.t, rc, C, pivot, keep);
  if (mode == kSmooth) return stats_vec<T, kSmooth, TR, ENT>(row.z, row.t, rc, C, pivot, keep);
  return stats_vec<T, kProb, TR, ENT>(row.z, row.t, rc, C, pivot, keep);
}

// keep / kept: a row of C floats that carries the values from row_stats to
// row_grad (contiguous float rows only), or nullptr.
template <typename T, typename acc_t, int TR>
FSCE_VINLINE Stats<acc_t> row_stats(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C, int mode,
                                    acc_t pivot, float* keep) {
  if constexpr (!std::is_same_v<T, double>) {
    if (row.step == 1) {
      // The entropy only with the statistics: the plain pass pays nothing for it.
      if (rc.stats) return stats_vec_mode<T, TR, true>(row, rc, C, mode, pivot, keep);
      return stats_vec_mode<T, TR, false>(row, rc, C, mode, pivot, keep);
    }
  }
  return stats_scalar<T, acc_t, TR>(row, rc, C, mode, pivot);
}

template <typename T, typename acc_t, int TR>
FSCE_VINLINE acc_t row_sum_coef(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C) {
  if constexpr (!std::is_same_v<T, double>) {
    if (row.step == 1) return sum_coef_vec<T, TR>(row.t, rc, C);
  }
  return sum_coef_scalar<T, acc_t, TR>(row, rc, C);
}

// ENT: with the entropy's gradient (the backward of a differentiated entropy).
template <typename T, typename acc_t, int TR, bool ENT>
FSCE_VINLINE void row_grad(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C, int mode,
                           acc_t lse_hi, acc_t lse_lo, GradCoefs<acc_t> c, int64_t y, const float* kept) {
  if constexpr (!std::is_same_v<T, double>) {
    if (row.step == 1) {
      if (mode == kPlain)
        return grad_vec<T, kPlain, TR, ENT>(row.z, row.t, row.g, rc, C, lse_hi, lse_lo, c, y, kept);
      if (mode == kSmooth)
        return grad_vec<T, kSmooth, TR, ENT>(row.z, row.t, row.g, rc, C, lse_hi, lse_lo, c, y, kept);
      return grad_vec<T, kProb, TR, ENT>(row.z, row.t, row.g, rc, C, lse_hi, lse_lo, c, y, kept);
    }
  }
  grad_scalar<T, acc_t, TR, ENT>(row, rc, C, mode, lse_hi, lse_lo, c, y);
}

template <typename T, typename acc_t>
FSCE_VINLINE void fill_row(T* out, int64_t C, int64_t step, acc_t value) {
  for (int64_t j = 0; j < C; ++j) out[j * step] = static_cast<T>(value);
}

template <typename T, int TR>
FSCE_VINLINE void forward_rows(const CEParams& p, int64_t begin, int64_t end, bool write_grad,
                               const float* tanh_table) {
  using acc_t = typename AccOf<T>::type;
  if constexpr (!std::is_same_v<T, double>) {
    if (p.inner > 1) return forward_columns<T, TR>(p, begin, end, write_grad);
  }
  const int64_t C = p.classes;
  const Recipe<acc_t, TR> rc = recipe_of<acc_t, TR>(p, tanh_table);
  const ForwardOut<acc_t> out = forward_out<acc_t>(p, write_grad);
  // The in-place forward's second pass reads the softcapped values from here
  // rather than computing the tanh again: C floats, reused row after row.
  std::unique_ptr<float[]> kept;
  if (TR == kSoftcap && write_grad && p.inner == 1 && !std::is_same_v<T, double>) kept.reset(new float[C]);
  for (int64_t r = begin; r < end; ++r) {
    const Row<T> row = row_at<T>(p, r);
    const RowTarget<acc_t> tgt = row_target<acc_t>(p, r);
    if (tgt.ignored || tgt.invalid) {
      const acc_t fill = skip_row(out, p, r, tgt);
      if (write_grad) fill_row(row.g, C, row.step, fill);
      continue;
    }
    const int mode = row_mode(static_cast<bool>(row.t), tgt);
    const acc_t pivot = C > 0 ? finite_or_zero(rc.tr.value(static_cast<acc_t>(row.z[0]))) : acc_t(0);
    const Stats<acc_t> st = row_stats<T, acc_t, TR>(row, rc, C, mode, pivot, kept.get());
    const acc_t v_y = tgt.y >= 0 ? rc.tr.value(static_cast<acc_t>(row.z[tgt.y * row.step])) : acc_t(0);
    const GradCoefs<acc_t> c = finish_row(out, p, r, tgt, mode, st, pivot, v_y);
    if (write_grad) row_grad<T, acc_t, TR, false>(row, rc, C, mode, st.m, st.log_s, c, tgt.y, kept.get());
  }
}

template <typename T, int TR>
FSCE_VINLINE void backward_rows(const CEParams& p, int64_t begin, int64_t end, const float* tanh_table) {
  using acc_t = typename AccOf<T>::type;
  if constexpr (!std::is_same_v<T, double>) {
    if (p.inner > 1) return backward_columns<T, TR>(p, begin, end);
  }
  const int64_t C = p.classes;
  const Recipe<acc_t, TR> rc = recipe_of<acc_t, TR>(p, tanh_table);
  for (int64_t r = begin; r < end; ++r) {
    const Row<T> row = row_at<T>(p, r);
    const RowTarget<acc_t> tgt = row_target<acc_t>(p, r);
    if (tgt.ignored || tgt.invalid) {
      fill_row(row.g, C, row.step, tgt.ignored ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN());
      continue;
    }
    const int mode = row_mode(static_cast<bool>(row.t), tgt);
    const acc_t row_sum = mode == kProb ? row_sum_coef<T, acc_t, TR>(row, rc, C) : acc_t(0);
    const GradCoefs<acc_t> c = backward_coefs<acc_t>(p, r, tgt, mode, row_sum);
    acc_t lse_hi, lse_lo;
    split_lse(static_cast<const double*>(p.lse)[r], lse_hi, lse_lo);
    if (p.grad_entropy)
      row_grad<T, acc_t, TR, true>(row, rc, C, mode, lse_hi, lse_lo, c, tgt.y, nullptr);
    else
      row_grad<T, acc_t, TR, false>(row, rc, C, mode, lse_hi, lse_lo, c, tgt.y, nullptr);
  }
}

// One instantiation per transform; the transform is fixed for a launch.
template <typename T>
FSCE_VINLINE void forward_any(const CEParams& p, int64_t begin, int64_t end, bool write_grad,
                              const float* tanh_table) {
  switch (transform_of(p)) {
    case kIdentity: return forward_rows<T, kIdentity>(p, begin, end, write_grad, nullptr);
    case kScale: return forward_rows<T, kScale>(p, begin, end, write_grad, nullptr);
    default: return forward_rows<T, kSoftcap>(p, begin, end, write_grad, tanh_table);
  }
}

template <typename T>
FSCE_VINLINE void backward_any(const CEParams& p, int64_t begin, int64_t end, const float* tanh_table) {
  switch (transform_of(p)) {
    case kIdentity: return backward_rows<T, kIdentity>(p, begin, end, nullptr);
    case kScale: return backward_rows<T, kScale>(p, begin, end, nullptr);
    default: return backward_rows<T, kSoftcap>(p, begin, end, tanh_table);
  }
}

// Out-of-line entry points: instantiated here, so compiled for this ISA.
template <typename T>
void forward_entry(const CEParams& p, int64_t b, int64_t e, bool wg, const float* tt) {
  forward_any<T>(p, b, e, wg, tt);
}

template <typename T>
void backward_entry(const CEParams& p, int64_t b, int64_t e, const float* tt) {
  backward_any<T>(p, b, e, tt);
}

template <typename T>
void tanh_table_entry(const CEParams& p, float* table) {
  fill_tanh_table<T>(p, table);
}

template <typename T>
constexpr DTypeKernels kernels_of() {
  if constexpr (sizeof(T) == 2) return {forward_entry<T>, backward_entry<T>, tanh_table_entry<T>};
  return {forward_entry<T>, backward_entry<T>, nullptr};
}

}  // namespace
}  // namespace fsce::cpu

// isa.h's kernels of every dtype for the ISA `ns`, compiled here.
#define FSCE_DEFINE_ISA_KERNELS(ns)                                                                   \
  namespace fsce::cpu::ns {                                                                           \
  const DTypeKernels f32 = kernels_of<float>(), bf16 = kernels_of<c10::BFloat16>(),                   \
                     f16 = kernels_of<c10::Half>(), f64 = kernels_of<double>();                      \
  }
