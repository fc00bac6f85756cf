// Fused softmax cross-entropy on the CPU.
//
// Contiguous rows (inner == 1) of float/bf16/fp16 take the SIMD path (16
// lanes on AVX-512, 8 on AVX2 and the baseline): the forward is one online
// pass (running max and rescaled sum per lane), the backward one read and one
// write. Spatial rows (N, C, d1..dk) take a SIMD path of their own, a lane
// per inner position; float64 a strided scalar path. Rows are split across
// threads with at::parallel_for.
//
// Layers: rows.h (a row, a launch's recipe, the scalar path), rows_simd.h
// (the SIMD path of contiguous rows), rows_spatial.h (of spatial rows),
// row_kernels.h (a launch's rows, compiled once per ISA by
// kernels_<isa>.cpp), isa.cpp (which ISA runs); this file splits launches
// into rows and holds the entry points.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../row_math.h"
#include "huge_pages.h"
#include "isa.h"

namespace fsce::cpu {
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

std::unique_ptr<float[]> tanh_table(const IsaKernels& isa, const CEParams& p) {
  const bool half = p.dtype == DType::BFloat16 || p.dtype == DType::Float16;
  if (!half || transform_of(p) != kSoftcap || p.inner != 1 || p.rows * p.classes < kTanhTableMinElements) return nullptr;
  std::unique_ptr<float[]> table(new float[kTanhTableSize]);
  isa.of(p.dtype).tanh_table(p, table.get());
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
      T* row = static_cast<T*>(p.grad) + row_offsets(p, r).grad;
      const acc_t k = g[r * p.grad_output_stride];
      for (int64_t j = 0; j < p.classes; ++j) {
        T& v = row[j * p.inner];
        v = static_cast<T>(static_cast<acc_t>(v) * k);
      }
    }
  });
}

}  // namespace

void forward(const CEParams& p, bool write_grad) {
  const IsaKernels& isa = active_isa();
  const std::unique_ptr<float[]> table = tanh_table(isa, p);
  const float* tt = table.get();
  const auto rows = isa.of(p.dtype).forward;
  at::parallel_for(0, p.rows, row_grain(p), [&](int64_t b, int64_t e) { rows(p, b, e, write_grad, tt); });
}

void backward(const CEParams& p) {
  advise_huge_pages(p.grad, p.outer * p.grad_outer_stride * element_size(p.dtype));
  const IsaKernels& isa = active_isa();
  const std::unique_ptr<float[]> table = tanh_table(isa, p);
  const float* tt = table.get();
  const auto rows = isa.of(p.dtype).backward;
  at::parallel_for(0, p.rows, row_grain(p), [&](int64_t b, int64_t e) { rows(p, b, e, tt); });
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

const char* isa_name() { return active_isa().name; }

}  // namespace fsce::cpu
