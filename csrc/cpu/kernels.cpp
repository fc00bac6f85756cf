// Fused softmax cross-entropy on the CPU.
//
// Contiguous rows (inner == 1) of float/bf16/fp16 take the 16-lane SIMD path:
// the forward is one online pass (running max and rescaled sum per lane), the
// backward one read and one write. Spatial rows (N, C, d1..dk) and float64
// take a strided scalar path. Rows are split across threads with
// at::parallel_for.
#include "kernels.h"

#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../row_math.h"
#include "simd.h"

namespace fsce::cpu {
namespace {

// lse = m + log_s, kept as two parts so that z - lse loses no precision.
template <typename acc_t>
struct Stats {
  acc_t m, log_s, sum_a, sum_az;
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
    if (count == kLanes) return acc ? load16(acc + j) : load16(own + j);
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
  const RowOffsets off = row_offsets(p, r);
  Row<T> row;
  row.z = static_cast<const T*>(p.logits) + off.logits;
  using acc_t = typename AccOf<T>::type;
  row.t = {nullptr, nullptr};
  if (p.target_prob && p.target_prob_acc)
    row.t.acc = static_cast<const acc_t*>(p.target_prob) + off.target;
  else if (p.target_prob)
    row.t.own = static_cast<const T*>(p.target_prob) + off.target;
  row.g = p.grad ? static_cast<T*>(p.grad) + off.grad : nullptr;
  row.step = p.inner;
  return row;
}

template <typename T>
FSCE_VINLINE int row_mode(const Row<T>& row, const RowTarget<typename AccOf<T>::type>& tgt) {
  return row.t ? kProb : (tgt.k != 0 ? kSmooth : kPlain);
}

// ---------------------------------------------------------------- scalar path

template <typename T, typename acc_t>
FSCE_VINLINE acc_t coef_scalar(const Row<T>& row, const acc_t* w, int64_t j, int mode, acc_t eps,
                               acc_t inv_c) {
  const acc_t wj = w ? w[j] : acc_t(1);
  if (mode != kProb) return wj;
  return prob_coef<acc_t>(row.t.at(j * row.step), wj, eps, inv_c);
}

template <typename T, typename acc_t>
FSCE_VINLINE Stats<acc_t> stats_scalar(const Row<T>& row, const acc_t* w, int64_t C, int mode,
                                       acc_t eps, acc_t pivot) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < C; ++j) {
    const acc_t x = static_cast<acc_t>(row.z[j * row.step]);
    m = (x > m || x != x) ? x : m;
  }
  const acc_t shift = std::isinf(m) && m < 0 ? acc_t(0) : m;
  const acc_t inv_c = acc_t(1) / C;
  acc_t s = 0, sa = 0, saz = 0;
  for (int64_t j = 0; j < C; ++j) {
    const acc_t x = static_cast<acc_t>(row.z[j * row.step]);
    s += std::exp(x - shift);
    if (mode != kPlain) {
      const acc_t a = coef_scalar(row, w, j, mode, eps, inv_c);
      sa += a;
      saz += a * (x - pivot);
    }
  }
  return {m, std::log(s), sa, saz};
}

template <typename T, typename acc_t>
FSCE_VINLINE acc_t sum_coef_scalar(const Row<T>& row, const acc_t* w, int64_t C, acc_t eps) {
  const acc_t inv_c = acc_t(1) / C;
  acc_t sa = 0;
  for (int64_t j = 0; j < C; ++j) sa += coef_scalar(row, w, j, kProb, eps, inv_c);
  return sa;
}

template <typename T, typename acc_t>
FSCE_VINLINE void grad_scalar(const Row<T>& row, T* out, const acc_t* w, int64_t C, int mode,
                              acc_t eps, acc_t lse_hi, acc_t lse_lo, acc_t gA, acc_t gk, acc_t gy,
                              int64_t y) {
  const acc_t inv_c = acc_t(1) / C;
  for (int64_t j = 0; j < C; ++j) {
    const acc_t x = static_cast<acc_t>(row.z[j * row.step]);
    acc_t v = gA * std::exp((x - lse_hi) - lse_lo);
    if (mode != kPlain) v -= gk * coef_scalar(row, w, j, mode, eps, inv_c);
    if (j == y) v -= gy;
    out[j * row.step] = static_cast<T>(v);
  }
}

// ------------------------------------------------------------------ SIMD path

FSCE_VINLINE vint lane_ids() { return vint{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

// a_j for 16 classes starting at j; lanes at or past `count` are 0.
template <typename T, int MODE>
FSCE_VINLINE vfloat coef_vec(Probs<T> t, const float* w, int64_t j, int count, float eps, float inv_c) {
  const bool full = count == kLanes;
  vfloat a = w ? (full ? load16(w + j) : load_partial(w + j, count, 0.f)) : splat(1.f);
  if constexpr (MODE == kProb) {
    const vfloat tj = t.vec(j, count);
    a = a * ((1.f - eps) * tj + eps * inv_c);
  }
  return full ? a : (lane_ids() < count ? a : vfloat{});
}

// Folds NV vectors into the per-lane running max and rescaled sum: one
// rescale per NV vectors, one exp2 per element.
template <int NV>
FSCE_VINLINE void absorb(vfloat& m, vfloat& s, const vfloat (&x)[NV]) {
  vfloat cm = x[0];
  for (int k = 1; k < NV; ++k) cm = vmax(cm, x[k]);
  const vfloat nm = vmax(m, cm);
  // A lane that has seen only -inf keeps shift 0, so that exp2 sees -inf, not nan.
  const vfloat shift = nm == -std::numeric_limits<float>::infinity() ? vfloat{} : nm;
  vfloat acc = s * exp2v((m - shift) * kLog2e);
  for (int k = 0; k < NV; ++k) acc += exp2v((x[k] - shift) * kLog2e);
  s = acc;
  m = nm;
}

template <typename T, int MODE, int NV>
FSCE_VINLINE void absorb_chunk(const T* z, Probs<T> t, const float* w, int64_t j, float eps,
                               float inv_c, float pivot, vfloat& m, vfloat& s, vfloat& sa,
                               vfloat& saz) {
  vfloat x[NV];
  for (int k = 0; k < NV; ++k) x[k] = load16(z + j + k * kLanes);
  absorb<NV>(m, s, x);
  if constexpr (MODE != kPlain) {
    for (int k = 0; k < NV; ++k) {
      const vfloat a = coef_vec<T, MODE>(t, w, j + k * kLanes, kLanes, eps, inv_c);
      sa += a;
      saz += a * (x[k] - pivot);
    }
  }
}

template <typename T, int MODE>
FSCE_VINLINE Stats<float> stats_vec(const T* z, Probs<T> t, const float* w, int64_t C, float eps,
                                    float pivot) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const float inv_c = 1.f / C;
  vfloat m = splat(-kInf), s{}, sa{}, saz{};
  int64_t j = 0;
  for (; j + 4 * kLanes <= C; j += 4 * kLanes)
    absorb_chunk<T, MODE, 4>(z, t, w, j, eps, inv_c, pivot, m, s, sa, saz);
  for (; j + kLanes <= C; j += kLanes)
    absorb_chunk<T, MODE, 1>(z, t, w, j, eps, inv_c, pivot, m, s, sa, saz);
  if (j < C) {
    const int count = static_cast<int>(C - j);
    const vfloat x[1] = {load_partial(z + j, count, -kInf)};
    absorb<1>(m, s, x);
    if constexpr (MODE != kPlain) {
      const vfloat a = coef_vec<T, MODE>(t, w, j, count, eps, inv_c);
      const vfloat xa = lane_ids() < count ? x[0] : splat(pivot);
      sa += a;
      saz += a * (xa - pivot);
    }
  }
  const float M = hmax(m);
  float S = 0.f;
  for (int l = 0; l < kLanes; ++l)
    if (m[l] != -kInf) S += s[l] * std::exp(m[l] - M);
  return {M, std::log(S), hsum(sa), hsum(saz)};
}

template <typename T>
FSCE_VINLINE float sum_coef_vec(Probs<T> t, const float* w, int64_t C, float eps) {
  const float inv_c = 1.f / C;
  vfloat sa{};
  for (int64_t j = 0; j < C; j += kLanes)
    sa += coef_vec<T, kProb>(t, w, j, static_cast<int>(std::min<int64_t>(kLanes, C - j)), eps,
                             inv_c);
  return hsum(sa);
}

template <typename T, int MODE>
FSCE_VINLINE void grad_vec(const T* z, Probs<T> t, const float* w, T* out, int64_t C, float eps,
                           float lse_hi, float lse_lo, float gA, float gk, float gy, int64_t y) {
  const float inv_c = 1.f / C;
  for (int64_t j = 0; j < C; j += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, C - j));
    const bool full = count == kLanes;
    const vfloat x = full ? load16(z + j) : load_partial(z + j, count, 0.f);
    vfloat v = gA * exp2v(((x - lse_hi) - lse_lo) * kLog2e);
    if constexpr (MODE != kPlain) v -= gk * coef_vec<T, MODE>(t, w, j, count, eps, inv_c);
    // The target's -coef_y is folded in fp32, before rounding to the output type.
    // A lane select, not v[y - j], so that v stays in a register.
    if (static_cast<uint64_t>(y - j) < kLanes) v = lane_ids() == int(y - j) ? v - gy : v;
    if (full)
      store16(out + j, v);
    else
      store_partial(out + j, v, count);
  }
}

// ------------------------------------------------------------ row dispatch

template <typename T, typename acc_t>
FSCE_VINLINE Stats<acc_t> row_stats(const Row<T>& row, const acc_t* w, int64_t C, int mode, acc_t eps,
                                    acc_t pivot) {
  if constexpr (!std::is_same_v<T, double>) {
    if (row.step == 1) {
      if (mode == kPlain) return stats_vec<T, kPlain>(row.z, row.t, w, C, eps, pivot);
      if (mode == kSmooth) return stats_vec<T, kSmooth>(row.z, row.t, w, C, eps, pivot);
      return stats_vec<T, kProb>(row.z, row.t, w, C, eps, pivot);
    }
  }
  return stats_scalar<T, acc_t>(row, w, C, mode, eps, pivot);
}

template <typename T, typename acc_t>
FSCE_VINLINE acc_t row_sum_coef(const Row<T>& row, const acc_t* w, int64_t C, acc_t eps) {
  if constexpr (!std::is_same_v<T, double>) {
    if (row.step == 1) return sum_coef_vec<T>(row.t, w, C, eps);
  }
  return sum_coef_scalar<T, acc_t>(row, w, C, eps);
}

template <typename T, typename acc_t>
FSCE_VINLINE void row_grad(const Row<T>& row, T* out, const acc_t* w, int64_t C, int mode, acc_t eps,
                           acc_t lse_hi, acc_t lse_lo, acc_t gA, acc_t gk, acc_t gy, int64_t y) {
  if constexpr (!std::is_same_v<T, double>) {
    if (row.step == 1) {
      if (mode == kPlain) return grad_vec<T, kPlain>(row.z, row.t, w, out, C, eps, lse_hi, lse_lo, gA, gk, gy, y);
      if (mode == kSmooth) return grad_vec<T, kSmooth>(row.z, row.t, w, out, C, eps, lse_hi, lse_lo, gA, gk, gy, y);
      return grad_vec<T, kProb>(row.z, row.t, w, out, C, eps, lse_hi, lse_lo, gA, gk, gy, y);
    }
  }
  grad_scalar<T, acc_t>(row, out, w, C, mode, eps, lse_hi, lse_lo, gA, gk, gy, y);
}

template <typename T, typename acc_t>
FSCE_VINLINE void fill_row(T* out, int64_t C, int64_t step, acc_t value) {
  for (int64_t j = 0; j < C; ++j) out[j * step] = static_cast<T>(value);
}

template <typename acc_t>
FSCE_VINLINE acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename T>
FSCE_VINLINE void forward_rows(const CEParams& p, int64_t begin, int64_t end, bool write_grad) {
  using acc_t = typename AccOf<T>::type;
  const int64_t C = p.classes;
  const acc_t* w = static_cast<const acc_t*>(p.weight);
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  const acc_t scale = write_grad ? *static_cast<const acc_t*>(p.grad_scale) : acc_t(0);
  const acc_t W = weight_total<acc_t>(p);
  auto* loss = static_cast<acc_t*>(p.loss);
  auto* lse_out = static_cast<double*>(p.lse);
  for (int64_t r = begin; r < end; ++r) {
    const Row<T> row = row_at<T>(p, r);
    const RowTarget<acc_t> tgt = row_target<acc_t>(p, r);
    if (tgt.ignored || tgt.invalid) {
      // An invalid index poisons its row rather than reading out of bounds.
      const acc_t fill = tgt.ignored ? acc_t(0) : quiet_nan<acc_t>();
      loss[r] = fill;
      lse_out[r] = fill;
      if (write_grad) fill_row(row.g, C, row.step, fill);
      continue;
    }
    const int mode = row_mode(row, tgt);
    const acc_t pivot = C > 0 ? finite_or_zero(static_cast<acc_t>(row.z[0])) : acc_t(0);
    const Stats<acc_t> st = row_stats<T, acc_t>(row, w, C, mode, eps, pivot);
    const acc_t sum_a = mode == kSmooth ? W : st.sum_a;
    const acc_t z_y = tgt.y >= 0 ? static_cast<acc_t>(row.z[tgt.y * row.step]) : acc_t(0);
    loss[r] = row_loss(tgt, st.m, st.log_s, z_y, pivot, sum_a, st.sum_az);
    lse_out[r] = static_cast<double>(st.m) + static_cast<double>(st.log_s);
    if (write_grad) {
      const acc_t A = tgt.coef_y + tgt.k * sum_a;
      row_grad<T, acc_t>(row, row.g, w, C, mode, eps, st.m, st.log_s, scale * A, scale * tgt.k,
                         scale * tgt.coef_y, tgt.y);
    }
  }
}

template <typename T>
FSCE_VINLINE void backward_rows(const CEParams& p, int64_t begin, int64_t end) {
  using acc_t = typename AccOf<T>::type;
  const int64_t C = p.classes;
  const acc_t* w = static_cast<const acc_t*>(p.weight);
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  const acc_t W = weight_total<acc_t>(p);
  const auto* lse = static_cast<const double*>(p.lse);
  const auto* grad_rows = static_cast<const acc_t*>(p.grad_rows);
  const auto* grad_lse = static_cast<const acc_t*>(p.grad_lse);
  for (int64_t r = begin; r < end; ++r) {
    const Row<T> row = row_at<T>(p, r);
    const RowTarget<acc_t> tgt = row_target<acc_t>(p, r);
    if (tgt.ignored || tgt.invalid) {
      fill_row(row.g, C, row.step, tgt.ignored ? acc_t(0) : quiet_nan<acc_t>());
      continue;
    }
    const int mode = row_mode(row, tgt);
    const acc_t g = grad_rows[r * p.grad_rows_stride];
    const acc_t h = grad_lse ? grad_lse[r] : acc_t(0);
    const acc_t sum_a =
        mode == kProb ? row_sum_coef<T, acc_t>(row, w, C, eps) : (mode == kSmooth ? W : acc_t(0));
    const acc_t A = tgt.coef_y + tgt.k * sum_a;
    acc_t lse_hi, lse_lo;
    split_lse(lse[r], lse_hi, lse_lo);
    row_grad<T, acc_t>(row, row.g, w, C, mode, eps, lse_hi, lse_lo, g * A + h, g * tgt.k,
                       g * tgt.coef_y, tgt.y);
  }
}

}  // namespace

// One entry point per dtype and ISA clone; everything below it is inlined so
// that each clone is compiled for its own instruction set.
#define FSCE_CPU_ENTRIES(T, suffix)                                                       \
  FSCE_CPU_CLONES void forward_##suffix(const CEParams& p, int64_t b, int64_t e, bool wg) { \
    forward_rows<T>(p, b, e, wg);                                                         \
  }                                                                                       \
  FSCE_CPU_CLONES void backward_##suffix(const CEParams& p, int64_t b, int64_t e) {         \
    backward_rows<T>(p, b, e);                                                            \
  }

FSCE_CPU_ENTRIES(float, f32)
FSCE_CPU_ENTRIES(c10::BFloat16, bf16)
FSCE_CPU_ENTRIES(c10::Half, f16)
FSCE_CPU_ENTRIES(double, f64)
#undef FSCE_CPU_ENTRIES

namespace {

// Rows per task: enough elements that scheduling stays negligible.
int64_t row_grain(const CEParams& p) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(p.classes, 1));
}

int64_t element_size(DType dtype) {
  return dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2;
}

// The backward's output is a fresh N x C buffer; on Linux, first-touch page
// faults on 4 KiB pages cost more than the kernel itself, so ask for huge
// pages (a hint: ignored where transparent huge pages are off).
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < int64_t(8 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
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
  const auto* g = static_cast<const acc_t*>(p.grad_rows);
  at::parallel_for(0, p.rows, row_grain(p), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Row<T> row = row_at<T>(p, r);
      const acc_t k = g[r * p.grad_rows_stride];
      for (int64_t j = 0; j < p.classes; ++j) {
        T& v = row.g[j * row.step];
        v = static_cast<T>(static_cast<acc_t>(v) * k);
      }
    }
  });
}

}  // namespace

void forward(const CEParams& p, bool write_grad) {
  at::parallel_for(0, p.rows, row_grain(p), [&](int64_t b, int64_t e) {
    by_dtype(
        p.dtype, [&] { forward_f32(p, b, e, write_grad); }, [&] { forward_bf16(p, b, e, write_grad); },
        [&] { forward_f16(p, b, e, write_grad); }, [&] { forward_f64(p, b, e, write_grad); });
  });
}

void backward(const CEParams& p) {
  advise_huge_pages(p.grad, p.outer * p.grad_outer_stride * element_size(p.dtype));
  at::parallel_for(0, p.rows, row_grain(p), [&](int64_t b, int64_t e) {
    by_dtype(
        p.dtype, [&] { backward_f32(p, b, e); }, [&] { backward_bf16(p, b, e); },
        [&] { backward_f16(p, b, e); }, [&] { backward_f64(p, b, e); });
  });
}

void scale_rows(const CEParams& p) {
  const bool unit = p.grad_rows_stride == 0 &&
                    (p.dtype == DType::Float64 ? *static_cast<const double*>(p.grad_rows) == 1.0
                                               : *static_cast<const float*>(p.grad_rows) == 1.f);
  if (unit) return;
  by_dtype(
      p.dtype, [&] { scale_rows_typed<float>(p); }, [&] { scale_rows_typed<c10::BFloat16>(p); },
      [&] { scale_rows_typed<c10::Half>(p); }, [&] { scale_rows_typed<double>(p); });
}

int64_t first_invalid_target(const CEParams& p) {
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t y = p.target_index[r];
    if (y != p.ignore_index && (y < 0 || y >= p.classes)) return r;
  }
  return -1;
}

}  // namespace fsce::cpu
