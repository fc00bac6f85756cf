// The kernel families: row kernels (a warp or a block per row), spatial
// rows (one or V adjacent rows per thread), split rows (a row's chunks over
// several blocks, then a merge) and scale_grad_'s row scaling.
#pragma once
#include "launch.h"
#include "row_phases.cuh"

namespace fsce::cuda {
// Included by kernels.cu alone (one translation unit): internal linkage.
namespace {

// Row kernels: 256 threads, at least 2 blocks resident per SM (a bound of
// 128 registers). Larger blocks would bound the in-place and float64 loops
// to 64 registers, where they spill.
constexpr int kRowThreads = 256;
constexpr int kRowBlocksPerSM = 2;

// In place, a block's row of up to kRowCacheBytes (on H100; see
// row_cache_bytes) stays in dynamic shared memory between its two passes
// (`cached`): 2 blocks still fit an SM.
constexpr int64_t kRowCacheBytes = 112 * 1024;

template <typename T, int G, int PHASE, int TR, bool STATS>
__global__ void __launch_bounds__(kRowThreads, kRowBlocksPerSM) rows_kernel(const CEParams p, bool cached) {
  constexpr int kGroups = kRowThreads / G;
  constexpr bool kCached = PHASE == kForwardInplace && G == kRowThreads;
  FSCE_DYNAMIC_SHARED(uint4, row_cache);
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / G;
  GroupWalker<T, G, kCached> walk{static_cast<int>(threadIdx.x % G), 0, p.classes,
                                  kCached && cached ? row_cache : nullptr};
  process_row<T, PHASE, TR, STATS>(p, r, r < p.rows, walk);
}

// At least 2 blocks per SM (128 registers): left to itself ptxas held the
// fp16 softcap in-place statistics variant to 80 registers and spilled in
// its gradient loop once the entropy's sum joined the partial state.
template <typename T, int PHASE, int TR, bool STATS>
__global__ void __launch_bounds__(256, 2) spatial_kernel(const CEParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.rows) return;
  process_row<T, PHASE, TR, STATS>(p, r, true, StridedWalker<T>{p.classes, p.inner});
}

// Spatial rows, V = 8 / sizeof(T) adjacent ones per thread: consecutive s
// are adjacent in memory, so column j of the V rows is one 8-byte load (and
// store), and a 2-byte element no longer pays a 64-bit address of its own.
// Plain rows only (class-index targets, no smoothing, no statistics), with
// S, the pointers and the outer strides multiples of V elements (checked by
// spatial_rows_fit). The vector loops carry no per-row test: after the
// gradient pass the same thread rewrites each row's target column (its -gy
// term) and fills its skipped rows (ignored or invalid targets).
template <typename T>
constexpr int spatial_rows() {
  return 8 / static_cast<int>(sizeof(T));
}
constexpr int kSpatialCols = 4;  // columns per iteration: 4 loads in flight

template <typename T, int PHASE, int TR>
__global__ void __launch_bounds__(256) spatial_rows_kernel(const CEParams p) {
  using acc_t = typename AccOf<T>::type;
  constexpr int V = spatial_rows<T>(), K = kSpatialCols;
  using Vec = VecOf<V * sizeof(T)>;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (r0 >= p.rows) return;
  const int64_t C = p.classes, S = p.inner;
  const LogitTransform<TR, acc_t> tr = logit_transform<TR, acc_t>(p);
  const T* z = static_cast<const T*>(p.logits) + row_offsets(p, r0).logits;
  acc_t hi[V], lo[V], z_y[V];
  GradCoefs<acc_t> c[V];
  // Plain rows have no a_j terms: sum_a = 0.
  if constexpr (PHASE == kBackward) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const RowContext<T, TR> row(p, r0 + k, true);
      acc_t scale, lse_grad;
      EntropySaved<acc_t> no_entropy;
      load_saved<false>(p, r0 + k, row, hi[k], lo[k], scale, lse_grad, no_entropy);
      c[k] = grad_coefs(row.tgt, acc_t(0), scale, lse_grad);
      z_y[k] = row.z_y();
    }
  } else {
    acc_t pivot[V], v_y[V];
    Partial<acc_t> part[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const RowContext<T, TR> row(p, r0 + k, true);
      pivot[k] = row.pivot();  // read before any write (in place)
      z_y[k] = row.z_y();
      v_y[k] = row.v_y();
      part[k] = empty_partial<acc_t>();
    }
    const T* col = z;
    int64_t j = 0;
#pragma unroll 1
    for (; j + K <= C; j += K) {
      acc_t v[V][K];
#pragma unroll
      for (int i = 0; i < K; ++i, col += S) {
        const auto x = unpack<T>(*reinterpret_cast<const Vec*>(col));
#pragma unroll
        for (int k = 0; k < V; ++k) v[k][i] = tr.value(x.x[k]);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) absorb<false>(part[k], v[k], j);
    }
    for (; j < C; ++j, col += S) {
      const auto x = unpack<T>(*reinterpret_cast<const Vec*>(col));
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t v[1] = {tr.value(x.x[k])};
        absorb<false>(part[k], v, j);
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const RowContext<T, TR> row(p, r0 + k, true);
      write_loss<false>(p, r0 + k, row, part[k], pivot[k], v_y[k]);  // skipped rows: fill
      if constexpr (PHASE == kForwardInplace) {
        acc_t scale, lse_grad;
        inplace_saved(p, r0 + k, part[k], hi[k], lo[k], scale, lse_grad);
        c[k] = grad_coefs(row.tgt, acc_t(0), scale, lse_grad);
      }
    }
  }
  if constexpr (PHASE != kForward) {
    T* g = static_cast<T*>(p.grad) + row_offsets(p, r0).grad;
    // grad = dvalue * gA * p_j for every column of the V rows; the loads of
    // K columns are issued before their stores (in place they may alias).
    const auto grad_of = [&](const Vec& in) {
      const auto x = unpack<T>(in);
      Vec out;
      T* res = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc_t slope;
        const acc_t d = softmax_grad<false>(tr, x.x[k], hi[k], lo[k], c[k], slope);
        res[k] = from_acc<T>(TR == kIdentity ? d : d * slope);
      }
      return out;
    };
    int64_t j = 0;
#pragma unroll 1
    for (; j + K <= C; j += K) {
      Vec in[K];
#pragma unroll
      for (int i = 0; i < K; ++i) in[i] = *reinterpret_cast<const Vec*>(z + (j + i) * S);
#pragma unroll
      for (int i = 0; i < K; ++i) *reinterpret_cast<Vec*>(g + (j + i) * S) = grad_of(in[i]);
    }
    for (; j < C; ++j) *reinterpret_cast<Vec*>(g + j * S) = grad_of(*reinterpret_cast<const Vec*>(z + j * S));
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const RowContext<T, TR> row(p, r0 + k, true);
      if (row.skip) {
        const T fill = from_acc<T>(row.fill());
        for (int64_t i = 0; i < C; ++i) g[k + i * S] = fill;
      } else if (row.has_y()) {
        acc_t slope;
        const acc_t d = softmax_grad<false>(tr, z_y[k], hi[k], lo[k], c[k], slope) - c[k].gy;
        g[k + row.tgt.y * S] = from_acc<T>(TR == kIdentity ? d : d * slope);
      }
    }
  }
}

// Split rows: few rows of many classes. Block b covers columns
// [s * chunk, (s + 1) * chunk) of row b / splits, s = b % splits, so that the
// grid fills the GPU whatever N is.
constexpr int kSplitThreads = 256;

// The row of this block and a walker over its chunk of columns.
template <typename T>
__device__ __forceinline__ GroupWalker<T, kSplitThreads> chunk_walker(const CEParams& p, int splits,
                                                                     int64_t chunk, int64_t& r) {
  r = blockIdx.x / splits;
  const int64_t begin = (blockIdx.x % splits) * chunk;
  const int64_t end = begin + chunk < p.classes ? begin + chunk : p.classes;
  return {static_cast<int>(threadIdx.x), begin, end};
}

template <typename T, int TR, bool STATS>
__global__ void __launch_bounds__(kSplitThreads) split_stats_kernel(const CEParams p, int splits,
                                                                   int64_t chunk) {
  using acc_t = typename AccOf<T>::type;
  int64_t r;
  const GroupWalker<T, kSplitThreads> walk = chunk_walker<T>(p, splits, chunk, r);
  const RowContext<T, TR> row(p, r, true);
  const Partial<acc_t> part = walk.template reduce<STATS>(row_partial<STATS>(row, walk, row.pivot()));
  if (threadIdx.x == 0) static_cast<Partial<acc_t>*>(p.workspace)[blockIdx.x] = part;
}

// Merges each row's partials in split order (deterministic) and writes loss and lse.
template <typename T, int TR, bool STATS>
__global__ void __launch_bounds__(256) split_finish_kernel(const CEParams p, int splits) {
  using acc_t = typename AccOf<T>::type;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.rows) return;
  const RowContext<T, TR> row(p, r, true);
  const auto* parts = static_cast<const Partial<acc_t>*>(p.workspace) + r * splits;
  Partial<acc_t> part = parts[0];
  for (int s = 1; s < splits; ++s) part = merge<STATS>(part, parts[s]);
  write_loss<STATS>(p, r, row, part, row.pivot(), row.v_y());
}

// Gradient of class-index rows from a saved lse, one chunk of one row per
// block. `scale` is read at grad_output[r * grad_output_stride]; ENT: with
// the entropy's gradient.
template <typename T, int TR, bool ENT>
__global__ void __launch_bounds__(kSplitThreads) split_grad_kernel(const CEParams p, int splits,
                                                                  int64_t chunk) {
  using acc_t = typename AccOf<T>::type;
  int64_t r;
  const GroupWalker<T, kSplitThreads> walk = chunk_walker<T>(p, splits, chunk, r);
  const RowContext<T, TR> row(p, r, true);
  acc_t hi, lo, scale, lse_grad;
  EntropySaved<acc_t> ent;
  load_saved<ENT>(p, r, row, hi, lo, scale, lse_grad, ent);
  write_grad<ENT>(row, walk, hi, lo, scale, row_sum_a<acc_t>(p, row.mode, acc_t(0)), lse_grad, ent);
}

// scale_grad_: grad[row] *= grad_output[row], rows walked as by the row
// kernels (G threads per contiguous row with 16-byte vectors, or G == 1: a
// thread per spatial row), grid-stride over rows: no division per element.
constexpr int kScaleThreads = 256;

template <typename T, int G>
__global__ void __launch_bounds__(kScaleThreads) scale_kernel(const CEParams p) {
  using acc_t = typename AccOf<T>::type;
  const auto* g = static_cast<const acc_t*>(p.grad_output);
  // The usual loss.backward() of a mean or sum: nothing to do, and no host
  // sync to find that out.
  if (p.grad_output_stride == 0 && g[0] == acc_t(1)) return;
  constexpr int kGroups = kScaleThreads / G;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / G; r < p.rows;
       r += static_cast<int64_t>(gridDim.x) * kGroups) {
    T* row = static_cast<T*>(p.grad) + row_offsets(p, r).grad;
    const acc_t k = g[r * p.grad_output_stride];
    const auto times_k = [&](int64_t, const auto& x) {
      std::remove_const_t<std::remove_reference_t<decltype(x)>> out;
#pragma unroll
      for (int i = 0; i < out.size; ++i) out.x[i] = x.x[i] * k;
      return out;
    };
    if constexpr (G == 1)
      StridedWalker<T>{p.classes, p.inner}.template transform<1, 16>(row, row, times_k);
    else
      GroupWalker<T, G>{static_cast<int>(threadIdx.x % G), 0, p.classes}.template transform<2, 16>(row, row, times_k);
  }
}

}  // namespace
}  // namespace fsce::cuda
