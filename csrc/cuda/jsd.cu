// Generalized JSD on CUDA: one block of 256 threads per row (the row's
// student and teacher values strided over the threads, int64 offsets).
// The forward makes an online max/sum pass over both rows, a block
// reduction, then the terms pass (its reads mostly hit L2: a row pair is
// at most a few hundred KB) and a second reduction; the backward reads each
// row pair once, from the forward's row statistics. Math: csrc/jsd_math.h.
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "../jsd_math.h"
#include "jsd_kernels.h"
#include "launch.h"
#include "reduce.cuh"  // to_acc, from_acc

namespace fsce::cuda {
namespace {

constexpr int kJsdThreads = 256;
constexpr int kWarps = kJsdThreads / 32;

// A running max and sum of exp(v - max).
template <typename acc_t>
struct MaxSum {
  acc_t m, s;
};

template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> merge_max_sum(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return {m, acc_t(0)};  // -inf - -inf would be nan
  return {m, a.s * jsd_exp(a.m - m) + b.s * jsd_exp(b.m - m)};
}

template <typename acc_t>
__device__ __forceinline__ void absorb(MaxSum<acc_t>& a, acc_t v) {
  if (v > a.m) {
    a.s = a.s * jsd_exp(a.m - v) + acc_t(1);
    a.m = v;
  } else if (v != -INFINITY) {
    a.s += jsd_exp(v - a.m);
  }
}

// Block-wide combine of one T per thread (op associative and commutative);
// every thread gets the result. `shared` holds kWarps values.
template <typename V, typename Shfl, typename Op>
__device__ __forceinline__ V block_reduce(V v, V* shared, Shfl shfl, Op op) {
  for (int off = 16; off > 0; off /= 2) v = op(v, shfl(v, off));
  __syncthreads();  // shared may still be read from an earlier reduction
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kWarps; ++w) v = op(v, shared[w]);
  return v;
}

template <typename acc_t>
struct RowSums {
  MaxSum<acc_t> s, t;
};

template <typename acc_t>
__device__ __forceinline__ RowSums<acc_t> shfl_sums(const RowSums<acc_t>& a, int off) {
  return {{__shfl_xor_sync(0xffffffffu, a.s.m, off), __shfl_xor_sync(0xffffffffu, a.s.s, off)},
          {__shfl_xor_sync(0xffffffffu, a.t.m, off), __shfl_xor_sync(0xffffffffu, a.t.s, off)}};
}

template <typename acc_t>
struct Pair {
  acc_t loss, x;
};

template <typename T, int FORM>
__global__ void __launch_bounds__(kJsdThreads) jsd_forward_kernel(const JsdParams p, JsdCoefs<typename AccOf<T>::type> c) {
  using acc_t = typename AccOf<T>::type;
  const int64_t r = blockIdx.x;
  auto* loss = static_cast<acc_t*>(p.loss);
  auto* stats = static_cast<RowStats<acc_t>*>(p.row_stats);
  if (p.labels && p.labels[r] == p.ignore_index) {
    if (threadIdx.x == 0) {
      loss[r] = 0;
      stats[r] = {0, 0, 0, 0, 0};
    }
    return;
  }
  const T* zs = static_cast<const T*>(p.student) + r * p.student_stride;
  const T* zt = static_cast<const T*>(p.teacher) + r * p.teacher_stride;
  RowSums<acc_t> sums{{-INFINITY, 0}, {-INFINITY, 0}};
  for (int64_t j = threadIdx.x; j < p.classes; j += kJsdThreads) {
    absorb(sums.s, to_acc(zs[j]) * c.inv_t);
    absorb(sums.t, to_acc(zt[j]) * c.inv_t);
  }
  __shared__ RowSums<acc_t> sums_shared[kWarps];
  sums = block_reduce(
      sums, sums_shared, [](const RowSums<acc_t>& a, int off) { return shfl_sums(a, off); },
      [](const RowSums<acc_t>& a, const RowSums<acc_t>& b) {
        return RowSums<acc_t>{merge_max_sum(a.s, b.s), merge_max_sum(a.t, b.t)};
      });
  const RowStats<acc_t> st{sums.s.m, jsd_log(sums.s.s), sums.t.m, jsd_log(sums.t.s), 0};
  Pair<acc_t> acc{0, 0};
  for (int64_t j = threadIdx.x; j < p.classes; j += kJsdThreads) {
    const acc_t s = (to_acc(zs[j]) * c.inv_t - st.s_max) - st.s_log_sum;
    const acc_t t = (to_acc(zt[j]) * c.inv_t - st.t_max) - st.t_log_sum;
    acc_t l, x;
    jsd_terms<FORM>(s, t, c, l, x);
    acc.loss += l;
    acc.x += x;
  }
  __shared__ Pair<acc_t> pair_shared[kWarps];
  acc = block_reduce(
      acc, pair_shared,
      [](const Pair<acc_t>& a, int off) {
        return Pair<acc_t>{__shfl_xor_sync(0xffffffffu, a.loss, off), __shfl_xor_sync(0xffffffffu, a.x, off)};
      },
      [](const Pair<acc_t>& a, const Pair<acc_t>& b) { return Pair<acc_t>{a.loss + b.loss, a.x + b.x}; });
  if (threadIdx.x == 0) {
    loss[r] = jsd_row_loss<FORM>(acc.loss, acc.x);
    stats[r] = {st.s_max, st.s_log_sum, st.t_max, st.t_log_sum, acc.x};
  }
}

template <typename T, int FORM>
__global__ void __launch_bounds__(kJsdThreads) jsd_backward_kernel(const JsdParams p, JsdCoefs<typename AccOf<T>::type> c) {
  using acc_t = typename AccOf<T>::type;
  const int64_t r = blockIdx.x;
  T* g = static_cast<T*>(p.grad) + r * p.grad_stride;
  if (p.labels && p.labels[r] == p.ignore_index) {
    for (int64_t j = threadIdx.x; j < p.classes; j += kJsdThreads) g[j] = from_acc<T>(acc_t(0));
    return;
  }
  const T* zs = static_cast<const T*>(p.student) + r * p.student_stride;
  const T* zt = static_cast<const T*>(p.teacher) + r * p.teacher_stride;
  const RowStats<acc_t> st = static_cast<const RowStats<acc_t>*>(p.row_stats)[r];
  const acc_t k = static_cast<const acc_t*>(p.grad_output)[r * p.grad_output_stride] * c.inv_t;
  // g may be zs (in place): each thread reads its elements before writing them.
  // float64 not unrolled: ptxas spills the row statistics of an unrolled body.
#pragma unroll(sizeof(acc_t) == 8 ? 1 : 4)
  for (int64_t j = threadIdx.x; j < p.classes; j += kJsdThreads) {
    const acc_t s = (to_acc(zs[j]) * c.inv_t - st.s_max) - st.s_log_sum;
    const acc_t t = (to_acc(zt[j]) * c.inv_t - st.t_max) - st.t_log_sum;
    g[j] = from_acc<T>(k * jsd_grad<FORM>(s, t, st.x, c));
  }
}

template <typename T, int FORM>
void launch(const JsdParams& p, bool forward, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  const JsdCoefs<acc_t> c = jsd_coefs<acc_t>(p);
  // One block per row: grid.x takes up to 2^31 - 1 blocks.
  const dim3 grid(static_cast<unsigned>(p.rows)), block(kJsdThreads);
  if (forward) {
    FSCE_LAUNCH((jsd_forward_kernel<T, FORM>), grid, block, 0, stream)(p, c);
  } else {
    FSCE_LAUNCH((jsd_backward_kernel<T, FORM>), grid, block, 0, stream)(p, c);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_form(const JsdParams& p, bool forward, cudaStream_t stream) {
  switch (jsd_form(p.beta)) {
    case kForwardKL: return launch<T, kForwardKL>(p, forward, stream);
    case kReverseKL: return launch<T, kReverseKL>(p, forward, stream);
    default: return launch<T, kMixture>(p, forward, stream);
  }
}

void dispatch(const JsdParams& p, bool forward, cudaStream_t stream) {
  if (p.rows == 0) return;
  switch (p.dtype) {
    case DType::Float32: return launch_form<float>(p, forward, stream);
    case DType::Float64: return launch_form<double>(p, forward, stream);
    case DType::Float16: return launch_form<__half>(p, forward, stream);
    case DType::BFloat16: return launch_form<__nv_bfloat16>(p, forward, stream);
  }
}

}  // namespace

void jsd_forward(const JsdParams& p, cudaStream_t stream) { dispatch(p, true, stream); }
void jsd_backward(const JsdParams& p, cudaStream_t stream) { dispatch(p, false, stream); }

}  // namespace fsce::cuda
