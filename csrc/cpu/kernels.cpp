// Fused softmax cross-entropy on the CPU.
//
// Contiguous rows (inner == 1) of float/bf16/fp16 take the 8-lane SIMD path:
// the forward is one online pass (running max and rescaled sum per lane), the
// backward one read and one write. Spatial rows (N, C, d1..dk) and float64
// take a strided scalar path. Rows are split across threads with
// at::parallel_for.
//
// Layers: rows.h (a row, a launch's recipe, the scalar path), rows_simd.h
// (the SIMD path); this file dispatches rows and holds the entry points.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "huge_pages.h"
#include "rows.h"
#include "rows_simd.h"
#include "simd.h"

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

template <typename acc_t>
FSCE_VINLINE acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename T, int TR>
FSCE_VINLINE void forward_rows(const CEParams& p, int64_t begin, int64_t end, bool write_grad,
                               const float* tanh_table) {
  using acc_t = typename AccOf<T>::type;
  const int64_t C = p.classes;
  const Recipe<acc_t, TR> rc = recipe_of<acc_t, TR>(p, tanh_table);
  const acc_t scale = write_grad ? *static_cast<const acc_t*>(p.grad_scale) : acc_t(0);
  const acc_t lse_scale = write_grad && p.lse_grad_scale ? *static_cast<const acc_t*>(p.lse_grad_scale) : acc_t(0);
  auto* loss = static_cast<acc_t*>(p.loss);
  auto* lse_out = static_cast<double*>(p.lse);
  auto* entropy = static_cast<acc_t*>(p.entropy);
  const auto* row_weight = static_cast<const acc_t*>(p.row_weight);
  // The in-place forward's second pass reads the softcapped values from here
  // rather than computing the tanh again: C floats, reused row after row.
  std::unique_ptr<float[]> kept;
  if (TR == kSoftcap && write_grad && p.inner == 1 && !std::is_same_v<T, double>) kept.reset(new float[C]);
  for (int64_t r = begin; r < end; ++r) {
    const Row<T> row = row_at<T>(p, r);
    const RowTarget<acc_t> tgt = row_target<acc_t>(p, r);
    if (tgt.ignored || tgt.invalid) {
      // An invalid index poisons its row rather than reading out of bounds.
      const acc_t fill = tgt.ignored ? acc_t(0) : quiet_nan<acc_t>();
      loss[r] = fill;
      lse_out[r] = fill;
      if (p.pred) p.pred[r] = -1;
      if (p.target_pred) p.target_pred[r] = -1;
      if (entropy) entropy[r] = fill;
      if (write_grad) fill_row(row.g, C, row.step, fill);
      continue;
    }
    const int mode = row_mode(static_cast<bool>(row.t), tgt);
    const acc_t pivot = C > 0 ? finite_or_zero(rc.tr.value(static_cast<acc_t>(row.z[0]))) : acc_t(0);
    const Stats<acc_t> st = row_stats<T, acc_t, TR>(row, rc, C, mode, pivot, kept.get());
    const acc_t sum_a = row_sum_a<acc_t>(p, mode, st.sum_a);
    const acc_t v_y = tgt.y >= 0 ? rc.tr.value(static_cast<acc_t>(row.z[tgt.y * row.step])) : acc_t(0);
    loss[r] = row_loss(tgt, st.m, st.log_s, v_y, pivot, sum_a, st.sum_az);
    const double lse = static_cast<double>(st.m) + static_cast<double>(st.log_s);
    lse_out[r] = lse;
    if (p.pred) p.pred[r] = st.pred < 0 ? -1 : st.pred + p.class_offset;
    if (p.target_pred) p.target_pred[r] = st.target_pred < 0 ? -1 : st.target_pred + p.class_offset;
    if (entropy) entropy[r] = st.entropy;
    if (write_grad) {
      const acc_t row_scale = row_weight ? scale * row_weight[r] : scale;
      const GradCoefs<acc_t> c = grad_coefs(tgt, sum_a, row_scale, lse_scale * static_cast<acc_t>(lse));
      row_grad<T, acc_t, TR, false>(row, rc, C, mode, st.m, st.log_s, c, tgt.y, kept.get());
    }
  }
}

template <typename T, int TR>
FSCE_VINLINE void backward_rows(const CEParams& p, int64_t begin, int64_t end, const float* tanh_table) {
  using acc_t = typename AccOf<T>::type;
  const int64_t C = p.classes;
  const Recipe<acc_t, TR> rc = recipe_of<acc_t, TR>(p, tanh_table);
  const auto* lse = static_cast<const double*>(p.lse);
  const auto* grad_output = static_cast<const acc_t*>(p.grad_output);
  const auto* grad_lse = static_cast<const acc_t*>(p.grad_lse);
  const auto* grad_entropy = static_cast<const acc_t*>(p.grad_entropy);
  const auto* entropy = static_cast<const acc_t*>(p.entropy);
  for (int64_t r = begin; r < end; ++r) {
    const Row<T> row = row_at<T>(p, r);
    const RowTarget<acc_t> tgt = row_target<acc_t>(p, r);
    if (tgt.ignored || tgt.invalid) {
      fill_row(row.g, C, row.step, tgt.ignored ? acc_t(0) : quiet_nan<acc_t>());
      continue;
    }
    const int mode = row_mode(static_cast<bool>(row.t), tgt);
    const acc_t sum_a = row_sum_a<acc_t>(p, mode, mode == kProb ? row_sum_coef<T, acc_t, TR>(row, rc, C) : acc_t(0));
    GradCoefs<acc_t> c = grad_coefs(tgt, sum_a, grad_output[r * p.grad_output_stride],
                                    grad_lse ? grad_lse[r] : acc_t(0));
    acc_t lse_hi, lse_lo;
    split_lse(lse[r], lse_hi, lse_lo);
    if (grad_entropy) {
      c.gH = grad_entropy[r];
      c.H = entropy[r];
      row_grad<T, acc_t, TR, true>(row, rc, C, mode, lse_hi, lse_lo, c, tgt.y, nullptr);
    } else {
      row_grad<T, acc_t, TR, false>(row, rc, C, mode, lse_hi, lse_lo, c, tgt.y, nullptr);
    }
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

}  // namespace

// One entry point per dtype and ISA clone; everything below it is inlined so
// that each clone is compiled for its own instruction set.
#define FSCE_CPU_ENTRIES(T, suffix)                                                                     \
  FSCE_CPU_CLONES void forward_##suffix(const CEParams& p, int64_t b, int64_t e, bool wg, const float* tt) { \
    forward_any<T>(p, b, e, wg, tt);                                                                       \
  }                                                                                                     \
  FSCE_CPU_CLONES void backward_##suffix(const CEParams& p, int64_t b, int64_t e, const float* tt) {         \
    backward_any<T>(p, b, e, tt);                                                                          \
  }

FSCE_CPU_ENTRIES(float, f32)
FSCE_CPU_ENTRIES(c10::BFloat16, bf16)
FSCE_CPU_ENTRIES(c10::Half, f16)
FSCE_CPU_ENTRIES(double, f64)
#undef FSCE_CPU_ENTRIES

FSCE_CPU_CLONES void tanh_table_bf16(const CEParams& p, float* table) { fill_tanh_table<c10::BFloat16>(p, table); }
FSCE_CPU_CLONES void tanh_table_f16(const CEParams& p, float* table) { fill_tanh_table<c10::Half>(p, table); }

namespace {

// Rows per task: enough elements that scheduling stays negligible.
int64_t row_grain(const CEParams& p) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(p.classes, 1));
}

int64_t element_size(DType dtype) {
  return dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2;
}

// The softcap's tanh table (see fill_tanh_table) for a launch of 16-bit
// contiguous rows with at least kTanhTableMinElements logits, or nullptr:
// filling it costs about what the tanh of 65536 logits would.
constexpr int64_t kTanhTableMinElements = 4 * kTanhTableSize;

std::unique_ptr<float[]> tanh_table(const CEParams& p) {
  const bool half = p.dtype == DType::BFloat16 || p.dtype == DType::Float16;
  if (!half || transform_of(p) != kSoftcap || p.inner != 1 || p.rows * p.classes < kTanhTableMinElements) return nullptr;
  std::unique_ptr<float[]> table(new float[kTanhTableSize]);
  if (p.dtype == DType::BFloat16)
    tanh_table_bf16(p, table.get());
  else
    tanh_table_f16(p, table.get());
  return table;
}

template <typename F32, typename BF16, typename F16, typename F64>
void by_dtype(DType dtype, F32 f32, BF16 bf16, F16 f16, F64 f64) {
  switch (dtype) {
    case DType::Float32: return f32();
    case DType::BFloat16: return bf16();
    case DType::Float16: return f16();
    case DType::Float64: return f64();
  }
}

template <typename T>
void scale_rows_typed(const CEParams& p) {
  using acc_t = typename AccOf<T>::type;
  const auto* g = static_cast<const acc_t*>(p.grad_output);
  at::parallel_for(0, p.rows, row_grain(p), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Row<T> row = row_at<T>(p, r);
      const acc_t k = g[r * p.grad_output_stride];
      for (int64_t j = 0; j < p.classes; ++j) {
        T& v = row.g[j * row.step];
        v = static_cast<T>(static_cast<acc_t>(v) * k);
      }
    }
  });
}

}  // namespace

void forward(const CEParams& p, bool write_grad) {
  const std::unique_ptr<float[]> table = tanh_table(p);
  const float* tt = table.get();
  at::parallel_for(0, p.rows, row_grain(p), [&](int64_t b, int64_t e) {
    by_dtype(
        p.dtype, [&] { forward_f32(p, b, e, write_grad, tt); }, [&] { forward_bf16(p, b, e, write_grad, tt); },
        [&] { forward_f16(p, b, e, write_grad, tt); }, [&] { forward_f64(p, b, e, write_grad, tt); });
  });
}

void backward(const CEParams& p) {
  advise_huge_pages(p.grad, p.outer * p.grad_outer_stride * element_size(p.dtype));
  const std::unique_ptr<float[]> table = tanh_table(p);
  const float* tt = table.get();
  at::parallel_for(0, p.rows, row_grain(p), [&](int64_t b, int64_t e) {
    by_dtype(
        p.dtype, [&] { backward_f32(p, b, e, tt); }, [&] { backward_bf16(p, b, e, tt); },
        [&] { backward_f16(p, b, e, tt); }, [&] { backward_f64(p, b, e, tt); });
  });
}

void scale_rows(const CEParams& p) {
  const bool unit = p.grad_output_stride == 0 &&
                    (p.dtype == DType::Float64 ? *static_cast<const double*>(p.grad_output) == 1.0
                                               : *static_cast<const float*>(p.grad_output) == 1.f);
  if (unit) return;
  by_dtype(
      p.dtype, [&] { scale_rows_typed<float>(p); }, [&] { scale_rows_typed<c10::BFloat16>(p); },
      [&] { scale_rows_typed<c10::Half>(p); }, [&] { scale_rows_typed<double>(p); });
}

int64_t first_invalid_target(const CEParams& p) {
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t y = p.target_index[r];
    if (y != p.ignore_index && (y < 0 || y >= p.total_classes)) return r;
  }
  return -1;
}

}  // namespace fsce::cpu
