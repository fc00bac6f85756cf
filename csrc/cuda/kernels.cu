// Fused softmax cross-entropy on CUDA.
//
// Contiguous rows (inner == 1): a group of G threads owns one row (a warp for
// small C, a whole block for large C). Loads are 16-byte vectors after a
// scalar head that reaches 16-byte alignment, so odd C such as 50257 keeps
// the vector path. The forward is one online pass (running max, rescaled
// once per vector, and sum, exp2-based, fp32); the backward recomputes
// softmax from the saved lse. Plain rows (class indices, no weights, no
// smoothing) have loops of their own, free of per-class coefficients.
// Spatial rows (N, C, S): threads laid along s so that loads over c
// coalesce; plain rows with S a multiple of V take V adjacent rows per thread
// (one 8-byte vector per column), the others one row per thread. All offsets
// are int64.
//
// Layers, each in its file: reduce.cuh (conversions, the online-softmax
// state), walkers.cuh (how threads cover and load a row), row_phases.cuh
// (one row's passes), row_kernels.cuh (the kernel families); this file holds
// launch and dispatch: device queries, the shared-memory opt-in, the plans
// and the entry points of kernels.h.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../launch_plan.h"
#include "kernels.h"
#include "launch.h"
#include "row_kernels.cuh"

namespace fsce::cuda {
namespace {

// Whether spatial_rows_kernel applies: plain rows, and vectors of V
// elements aligned in the logits and the gradient.
template <typename T>
bool spatial_rows_fit(const CEParams& p) {
  constexpr int V = spatial_rows<T>();
  const auto aligned = [](const void* ptr, int64_t outer_stride) {
    return reinterpret_cast<uintptr_t>(ptr) % (V * sizeof(T)) == 0 && outer_stride % V == 0;
  };
  return p.target_prob == nullptr && p.label_smoothing == 0 && p.inner % V == 0 &&
         aligned(p.logits, p.logits_outer_stride) && (p.grad == nullptr || aligned(p.grad, p.grad_outer_stride));
}

// Device values are cached per device, since one process may drive GPUs of
// different kinds; 0 means not yet known (every cached value is > 0).
constexpr int kMaxDevices = 64;
using DeviceCache = std::atomic<int64_t>[kMaxDevices];

int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

template <typename F>
int64_t per_device(DeviceCache& cache, int device, F&& compute) {
  if (device >= kMaxDevices) return compute();
  int64_t v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    v = compute();
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

int sm_count() {
  static DeviceCache counts;
  const int device = current_device();
  return static_cast<int>(
      per_device(counts, device, [&] { return device_attribute(cudaDevAttrMultiProcessorCount, device); }));
}

// The largest row kept in shared memory on this device: 2 blocks per SM
// must still fit, with their static memory and the runtime's reserved 1 KB
// each (2 KB of margin), and so must one block under the per-block opt-in
// limit; capped at kRowCacheBytes (H100's value; A100 gets 80 KB, sm_86/89
// 48 KB).
int64_t row_cache_bytes() {
  static DeviceCache bytes;
  const int device = current_device();
  return per_device(bytes, device, [&] {
    const int64_t per_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    const int64_t per_block = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    const int64_t fit = std::min<int64_t>(per_sm / kRowBlocksPerSM, per_block) - 2048;
    return std::min(fit, kRowCacheBytes);
  });
}

// Static and dynamic shared memory above 48 KB together need the opt-in.
// It is always set to the device's whole cache size (row_cache_bytes()), so
// that launches from several host threads never lower it under each other;
// the kernel's static size is queried, and the opt-in set, once per device.
template <typename T, int PHASE, int TR, bool STATS>
void allow_row_cache(int64_t smem, int64_t cache_bytes) {
  const auto kernel = rows_kernel<T, kRowThreads, PHASE, TR, STATS>;
  static DeviceCache static_smem, opted_in;  // static_smem holds sharedSizeBytes + 1
  const int device = current_device();
  const int64_t fixed = per_device(static_smem, device, [&] {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    return static_cast<int64_t>(attr.sharedSizeBytes) + 1;
  }) - 1;
  if (smem + fixed <= 48 * 1024) return;
  per_device(opted_in, device, [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(cache_bytes)));
    return int64_t(1);
  });
}

Split forward_split(const CEParams& p) {
  return fsce::forward_split(p.rows, p.classes, p.inner, p.target_prob != nullptr, sm_count());
}

Split backward_split(const CEParams& p) {
  return fsce::backward_split(p.inner, p.classes, p.target_prob != nullptr);
}

unsigned grid_of(int64_t blocks) { return static_cast<unsigned>(blocks); }

template <typename T, int PHASE, int TR, bool STATS>
void launch_rows(const CEParams& p, cudaStream_t stream) {
  if (p.inner > 1) {
    if constexpr (sizeof(T) <= 4 && !STATS) {
      if (spatial_rows_fit<T>(p)) {
        const int64_t threads = p.rows / spatial_rows<T>();
        FSCE_LAUNCH((spatial_rows_kernel<T, PHASE, TR>), grid_of((threads + 255) / 256), 256, 0, stream)(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    FSCE_LAUNCH((spatial_kernel<T, PHASE, TR, STATS>), grid_of((p.rows + 255) / 256), 256, 0, stream)(p);
  } else if (p.classes <= 2048) {
    FSCE_LAUNCH((rows_kernel<T, 32, PHASE, TR, STATS>), grid_of((p.rows + 7) / 8), kRowThreads, 0, stream)(p, false);
  } else {
    const int64_t row_bytes = (p.classes * static_cast<int64_t>(sizeof(T)) + 15) / 16 * 16;
    // A row over the largest cache of any device skips the device queries.
    const int64_t cache_bytes = PHASE == kForwardInplace && row_bytes <= kRowCacheBytes ? row_cache_bytes() : 0;
    const bool cached = row_bytes <= cache_bytes;
    const int smem = cached ? static_cast<int>(row_bytes) : 0;
    if (cached) allow_row_cache<T, PHASE, TR, STATS>(smem, cache_bytes);
    FSCE_LAUNCH((rows_kernel<T, kRowThreads, PHASE, TR, STATS>), grid_of(p.rows), kRowThreads, smem, stream)(p, cached);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int TR, bool ENT>
void launch_split_grad(const CEParams& p, Split split, cudaStream_t stream) {
  FSCE_LAUNCH((split_grad_kernel<T, TR, ENT>), grid_of(p.rows * split.splits), kSplitThreads, 0, stream)(
      p, split.splits, split.chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int TR, bool STATS>
void launch_forward_rows(const CEParams& p, bool write_grad, cudaStream_t stream) {
  const Split split = forward_split(p);
  if (split.splits == 1) {
    if (write_grad)
      launch_rows<T, kForwardInplace, TR, STATS>(p, stream);
    else
      launch_rows<T, kForward, TR, STATS>(p, stream);
    return;
  }
  FSCE_LAUNCH((split_stats_kernel<T, TR, STATS>), grid_of(p.rows * split.splits), kSplitThreads, 0, stream)(
      p, split.splits, split.chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  FSCE_LAUNCH((split_finish_kernel<T, TR, STATS>), grid_of((p.rows + 255) / 256), 256, 0, stream)(p, split.splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (write_grad) {
    // In place: the gradient pass reads the logits a second time (and the
    // lse that split_finish wrote, for the z-loss term).
    CEParams g = p;
    g.grad_output = p.grad_scale;
    g.grad_output_stride = 0;
    launch_split_grad<T, TR, false>(g, backward_split(g), stream);
  }
}

// The logit transform and the statistics change the per-element work, so
// they are template parameters: the plain path pays nothing for them.
template <typename F>
void by_transform(const CEParams& p, F&& f) {
  switch (transform_of(p)) {
    case kIdentity: return f(std::integral_constant<int, kIdentity>{});
    case kScale: return f(std::integral_constant<int, kScale>{});
    default: return f(std::integral_constant<int, kSoftcap>{});
  }
}

template <typename T>
void launch_forward(const CEParams& p, bool write_grad, cudaStream_t stream) {
  by_transform(p, [&](auto tr) {
    if (p.pred)
      launch_forward_rows<T, decltype(tr)::value, true>(p, write_grad, stream);
    else
      launch_forward_rows<T, decltype(tr)::value, false>(p, write_grad, stream);
  });
}

// The entropy's gradient is a template parameter too (the backward's STATS).
template <typename T, bool ENT>
void launch_backward_rows(const CEParams& p, cudaStream_t stream) {
  const Split split = backward_split(p);
  by_transform(p, [&](auto tr) {
    constexpr int TR = decltype(tr)::value;
    if (split.splits == 1)
      launch_rows<T, kBackward, TR, ENT>(p, stream);
    else
      launch_split_grad<T, TR, ENT>(p, split, stream);
  });
}

template <typename T>
void launch_backward(const CEParams& p, cudaStream_t stream) {
  if (p.grad_entropy)
    launch_backward_rows<T, true>(p, stream);
  else
    launch_backward_rows<T, false>(p, stream);
}

template <typename F>
void by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
}

}  // namespace

int64_t forward_workspace(const CEParams& p) {
  const Split split = forward_split(p);
  if (split.splits == 1) return 0;
  const int64_t part = p.dtype == DType::Float64 ? sizeof(Partial<double>) : sizeof(Partial<float>);
  return p.rows * split.splits * part;
}

void forward(const CEParams& p, bool write_grad, cudaStream_t stream) {
  by_dtype(p.dtype, [&](auto tag) { launch_forward<decltype(tag)>(p, write_grad, stream); });
}

void backward(const CEParams& p, cudaStream_t stream) {
  by_dtype(p.dtype, [&](auto tag) { launch_backward<decltype(tag)>(p, stream); });
}

void scale_rows(const CEParams& p, cudaStream_t stream) {
  // Row groups as the row kernels pick them; at most 8 blocks per SM, each
  // walking rows with a grid stride.
  const int G = p.inner > 1 ? 1 : p.classes <= 2048 ? 32 : kScaleThreads;
  const int64_t needed = (p.rows + kScaleThreads / G - 1) / (kScaleThreads / G);
  const int64_t wave = 8 * static_cast<int64_t>(sm_count());
  const unsigned blocks = grid_of(needed < wave ? needed : wave);
  by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (G == 1)
      FSCE_LAUNCH((scale_kernel<T, 1>), blocks, kScaleThreads, 0, stream)(p);
    else if (G == 32)
      FSCE_LAUNCH((scale_kernel<T, 32>), blocks, kScaleThreads, 0, stream)(p);
    else
      FSCE_LAUNCH((scale_kernel<T, kScaleThreads>), blocks, kScaleThreads, 0, stream)(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fsce::cuda
