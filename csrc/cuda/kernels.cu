// Fused softmax cross-entropy on CUDA.
//
// Contiguous rows (inner == 1): a group of G threads owns one row (a warp for
// small C, a whole block for large C). Loads are 16-byte vectors after a
// scalar head that reaches 16-byte alignment, so odd C such as 50257 keeps
// the vector path. The forward is one online pass (running max and rescaled
// sum, exp2-based, fp32); the backward recomputes softmax from the saved lse.
// Spatial rows (N, C, S): one thread per (n, s), threads laid along s so that
// loads over c coalesce. All offsets are int64.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../row_math.h"
#include "kernels.h"

namespace fsce::cuda {
namespace {

enum Phase : int { kForward = 0, kForwardInplace = 1, kBackward = 2 };

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

__device__ __forceinline__ float exp_acc(float x) { return exp2f(x * kLog2e); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -INFINITY;
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return static_cast<acc_t>(NAN);
}

// A partial online-softmax state: max, sum of exp(z - max), and the a_j sums.
template <typename acc_t>
struct Partial {
  acc_t m, s, sa, saz;
};

template <typename acc_t>
__device__ __forceinline__ Partial<acc_t> merge(Partial<acc_t> a, Partial<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  Partial<acc_t> out;
  out.m = m;
  // Both sides still at -inf: exp(-inf - -inf) would be nan.
  out.s = m == neg_inf<acc_t>() ? a.s + b.s : a.s * exp_acc(a.m - m) + b.s * exp_acc(b.m - m);
  out.sa = a.sa + b.sa;
  out.saz = a.saz + b.saz;
  return out;
}

template <typename acc_t>
__device__ __forceinline__ void absorb(Partial<acc_t>& p, acc_t x) {
  if (x > p.m) {
    p.s *= exp_acc(p.m - x);
    p.m = x;
  }
  if (x != neg_inf<acc_t>()) p.s += exp_acc(x - p.m);
}

template <typename acc_t>
__device__ __forceinline__ Partial<acc_t> shfl_xor(const Partial<acc_t>& p, int offset) {
  return {__shfl_xor_sync(0xffffffffu, p.m, offset), __shfl_xor_sync(0xffffffffu, p.s, offset),
          __shfl_xor_sync(0xffffffffu, p.sa, offset), __shfl_xor_sync(0xffffffffu, p.saz, offset)};
}

// G consecutive threads (G <= 32, or G == blockDim.x) own one row.
template <typename T, int G>
struct GroupWalker {
  using acc_t = typename AccOf<T>::type;
  static constexpr int kVec = 16 / sizeof(T);
  int lane;
  int64_t C;

  __device__ __forceinline__ bool leader() const { return lane == 0; }

  // Calls f(j, z_j) for this thread's elements of a contiguous row.
  template <typename F>
  __device__ __forceinline__ void each(const T* z, F&& f) const {
    const int64_t head = head_of(z);
    for (int64_t j = lane; j < head; j += G) f(j, to_acc(z[j]));
    const int64_t nvec = (C - head) / kVec;
    const uint4* body = reinterpret_cast<const uint4*>(z + head);
#pragma unroll 4
    for (int64_t v = lane; v < nvec; v += G) {
      const uint4 raw = body[v];
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) f(head + v * kVec + k, to_acc(vals[k]));
    }
    for (int64_t j = head + nvec * kVec + lane; j < C; j += G) f(j, to_acc(z[j]));
  }

  // out[j] = f(j, z_j); out may alias z (each element is read, then written, by one thread).
  template <typename F>
  __device__ __forceinline__ void transform(const T* z, T* out, F&& f) const {
    const bool same_phase =
        ((reinterpret_cast<uintptr_t>(z) ^ reinterpret_cast<uintptr_t>(out)) & 15) == 0;
    const int64_t head = same_phase ? head_of(z) : C;
    for (int64_t j = lane; j < head; j += G) out[j] = from_acc<T>(f(j, to_acc(z[j])));
    if (!same_phase) return;
    const int64_t nvec = (C - head) / kVec;
    const uint4* in_vec = reinterpret_cast<const uint4*>(z + head);
    uint4* out_vec = reinterpret_cast<uint4*>(out + head);
#pragma unroll 4
    for (int64_t v = lane; v < nvec; v += G) {
      const uint4 raw = in_vec[v];
      const T* vals = reinterpret_cast<const T*>(&raw);
      uint4 packed;
      T* res = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int k = 0; k < kVec; ++k) res[k] = from_acc<T>(f(head + v * kVec + k, to_acc(vals[k])));
      out_vec[v] = packed;
    }
    for (int64_t j = head + nvec * kVec + lane; j < C; j += G)
      out[j] = from_acc<T>(f(j, to_acc(z[j])));
  }

  __device__ __forceinline__ Partial<acc_t> reduce(Partial<acc_t> p) const {
    const int width = G < 32 ? G : 32;
    for (int off = width / 2; off > 0; off /= 2) p = merge(p, shfl_xor(p, off));
    if constexpr (G > 32) {
      __shared__ Partial<acc_t> warp_parts[G / 32];
      const int warp = threadIdx.x / 32;
      __syncthreads();  // warp_parts may still be read from an earlier reduce
      if (threadIdx.x % 32 == 0) warp_parts[warp] = p;
      __syncthreads();
      p = warp_parts[0];
      for (int w = 1; w < G / 32; ++w) p = merge(p, warp_parts[w]);
    }
    return p;
  }

 private:
  // Elements before the first 16-byte boundary of z (z is element-aligned).
  __device__ __forceinline__ int64_t head_of(const T* z) const {
    const int64_t head = ((16 - (reinterpret_cast<uintptr_t>(z) & 15)) & 15) / sizeof(T);
    return head < C ? head : C;
  }
};

// One thread owns one spatial row; element j is at [j * step].
template <typename T>
struct StridedWalker {
  using acc_t = typename AccOf<T>::type;
  int64_t C, step;

  __device__ __forceinline__ bool leader() const { return true; }

  template <typename F>
  __device__ __forceinline__ void each(const T* z, F&& f) const {
    for (int64_t j = 0; j < C; ++j) f(j, to_acc(z[j * step]));
  }

  template <typename F>
  __device__ __forceinline__ void transform(const T* z, T* out, F&& f) const {
    for (int64_t j = 0; j < C; ++j) out[j * step] = from_acc<T>(f(j, to_acc(z[j * step])));
  }

  __device__ __forceinline__ Partial<acc_t> reduce(Partial<acc_t> p) const { return p; }
};

// Everything one row does in one phase. `active` is false for the padding
// threads of a group past the last row: they join the reductions only.
template <typename T, int PHASE, typename Walker>
__device__ __forceinline__ void process_row(const CEParams& p, int64_t r, bool active,
                                            const Walker& walk) {
  using acc_t = typename AccOf<T>::type;
  const int64_t C = p.classes;
  const T* w = static_cast<const T*>(p.weight);
  const RowTarget<acc_t> tgt =
      row_target<acc_t>(p, active ? r : 0, [w](int64_t y) { return to_acc(w[y]); });
  const RowOffsets off = row_offsets(p, active ? r : 0);
  const T* z = static_cast<const T*>(p.logits) + off.logits;
  const T* t = p.target_prob ? static_cast<const T*>(p.target_prob) + off.target : nullptr;
  T* g_out = p.grad ? static_cast<T*>(p.grad) + off.grad : nullptr;
  const int64_t step = p.inner;
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  const bool skip = !active || tgt.ignored || tgt.invalid || C == 0;
  const int mode = t ? kProb : (tgt.k != 0 ? kSmooth : kPlain);
  auto coef = [&](int64_t j) -> acc_t {
    const acc_t wj = w ? to_acc(w[j]) : acc_t(1);
    return mode == kProb ? prob_coef<acc_t>(to_acc(t[j * step]), wj, eps, inv_c) : wj;
  };

  acc_t hi = 0, lo = 0, sum_a = 0, grad_scale = 0;
  if constexpr (PHASE != kBackward) {
    // Read before any thread of the row writes (the in-place phase overwrites z).
    const acc_t pivot = skip ? acc_t(0) : finite_or_zero(to_acc(z[0]));
    const acc_t z_y = (!skip && tgt.y >= 0) ? to_acc(z[tgt.y * step]) : acc_t(0);
    Partial<acc_t> part{neg_inf<acc_t>(), 0, 0, 0};
    if (!skip) {
      walk.each(z, [&](int64_t j, acc_t x) {
        absorb(part, x);
        if (mode != kPlain) {
          const acc_t a = coef(j);
          part.sa += a;
          part.saz += a * (x - pivot);
        }
      });
    }
    part = walk.reduce(part);
    hi = part.m;
    lo = log(part.s);
    sum_a = mode == kSmooth ? weight_total<acc_t>(p) : part.sa;
    if (active && walk.leader()) {
      const acc_t fill = tgt.ignored ? acc_t(0) : quiet_nan<acc_t>();
      static_cast<acc_t*>(p.loss)[r] = skip ? fill : row_loss(tgt, hi, lo, z_y, pivot, sum_a, part.saz);
      static_cast<double*>(p.lse)[r] = skip ? static_cast<double>(fill)
                                            : static_cast<double>(hi) + static_cast<double>(lo);
    }
    if constexpr (PHASE == kForward) return;
    grad_scale = *static_cast<const acc_t*>(p.grad_scale);
  } else {
    if (!skip) {
      const double lse = static_cast<const double*>(p.lse)[r];
      hi = static_cast<acc_t>(lse);
      lo = static_cast<acc_t>(lse - static_cast<double>(hi));
      grad_scale = static_cast<const acc_t*>(p.grad_rows)[r * p.grad_rows_stride];
    }
    if (mode == kProb) {
      Partial<acc_t> part{0, 0, 0, 0};
      if (!skip) walk.each(z, [&](int64_t j, acc_t) { part.sa += coef(j); });
      sum_a = walk.reduce(part).sa;
    } else if (mode == kSmooth) {
      sum_a = weight_total<acc_t>(p);
    }
  }

  if (!active) return;
  if (skip) {
    const acc_t fill = tgt.ignored ? acc_t(0) : quiet_nan<acc_t>();
    walk.transform(z, g_out, [&](int64_t, acc_t) { return fill; });
    return;
  }
  const acc_t gA = grad_scale * (tgt.coef_y + tgt.k * sum_a);
  const acc_t gk = grad_scale * tgt.k;
  const acc_t gy = grad_scale * tgt.coef_y;
  const int64_t y = tgt.y;
  walk.transform(z, g_out, [&](int64_t j, acc_t x) {
    acc_t v = gA * exp_acc((x - hi) - lo);
    if (mode != kPlain) v -= gk * coef(j);
    if (j == y) v -= gy;  // folded in fp32, before rounding to the output type
    return v;
  });
}

template <int G>
constexpr int block_threads() {
  return G > 256 ? G : 256;
}

template <typename T, int G, int PHASE>
__global__ void __launch_bounds__(block_threads<G>()) rows_kernel(const CEParams p) {
  constexpr int kGroups = block_threads<G>() / G;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / G;
  GroupWalker<T, G> walk{static_cast<int>(threadIdx.x % G), p.classes};
  process_row<T, PHASE>(p, r, r < p.rows, walk);
}

template <typename T, int PHASE>
__global__ void __launch_bounds__(256) spatial_kernel(const CEParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.rows) return;
  process_row<T, PHASE>(p, r, true, StridedWalker<T>{p.classes, p.inner});
}

template <typename T>
__global__ void __launch_bounds__(256) scale_kernel(const CEParams p) {
  using acc_t = typename AccOf<T>::type;
  const auto* g = static_cast<const acc_t*>(p.grad_rows);
  // The usual loss.backward() of a mean or sum: nothing to do, and no host
  // sync to find that out.
  if (p.grad_rows_stride == 0 && g[0] == acc_t(1)) return;
  const int64_t total = p.rows * p.classes;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / (p.classes * p.inner);
    const int64_t rest = e % (p.classes * p.inner);
    const int64_t j = rest / p.inner, s = rest % p.inner;
    T& v = static_cast<T*>(p.grad)[n * p.grad_outer_stride + j * p.inner + s];
    v = from_acc<T>(to_acc(v) * g[(n * p.inner + s) * p.grad_rows_stride]);
  }
}

int sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

template <typename T, int PHASE>
void launch_phase(const CEParams& p, cudaStream_t stream) {
  if (p.inner > 1) {
    const int64_t blocks = (p.rows + 255) / 256;
    spatial_kernel<T, PHASE><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  } else if (p.classes <= 2048) {
    rows_kernel<T, 32, PHASE><<<static_cast<unsigned>((p.rows + 7) / 8), 256, 0, stream>>>(p);
  } else if (p.classes <= 32768) {
    rows_kernel<T, 256, PHASE><<<static_cast<unsigned>(p.rows), 256, 0, stream>>>(p);
  } else {
    rows_kernel<T, 1024, PHASE><<<static_cast<unsigned>(p.rows), 1024, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int PHASE>
void dispatch(const CEParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::Float32: return launch_phase<float, PHASE>(p, stream);
    case DType::Float64: return launch_phase<double, PHASE>(p, stream);
    case DType::Float16: return launch_phase<__half, PHASE>(p, stream);
    case DType::BFloat16: return launch_phase<__nv_bfloat16, PHASE>(p, stream);
  }
}

}  // namespace

void forward(const CEParams& p, bool write_grad, cudaStream_t stream) {
  if (write_grad)
    dispatch<kForwardInplace>(p, stream);
  else
    dispatch<kForward>(p, stream);
}

void backward(const CEParams& p, cudaStream_t stream) { dispatch<kBackward>(p, stream); }

void scale_rows(const CEParams& p, cudaStream_t stream) {
  static const int blocks_per_sm_wave = 4 * sm_count();
  const int64_t needed = (p.rows * p.classes + 255) / 256;
  const int blocks = static_cast<int>(needed < blocks_per_sm_wave ? needed : blocks_per_sm_wave);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    scale_kernel<T><<<blocks, 256, 0, stream>>>(p);
  };
  switch (p.dtype) {
    case DType::Float32: launch(float{}); break;
    case DType::Float64: launch(double{}); break;
    case DType::Float16: launch(__half{}); break;
    case DType::BFloat16: launch(__nv_bfloat16{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fsce::cuda
