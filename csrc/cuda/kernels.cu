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

#include "../launch_plan.h"
#include "../row_math.h"
#include "kernels.h"

namespace fsce::cuda {
namespace {

enum Phase : int { kForward = 0, kForwardInplace = 1, kBackward = 2 };

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

// A partial online-softmax state over v: max, sum of exp(v - max), the a_j
// sums, and (statistics only) the first argmax of v and of a probability
// target, -1 while none has been seen.
template <typename acc_t>
struct Partial {
  acc_t m, s, sa, saz;
  int64_t pred;
  acc_t t_max;
  int64_t target_pred;
};

template <typename acc_t>
__device__ __forceinline__ Partial<acc_t> empty_partial() {
  return {neg_inf<acc_t>(), 0, 0, 0, -1, neg_inf<acc_t>(), -1};
}

// The first argmax of two halves: the larger value, the lower index on a tie.
template <typename acc_t>
__device__ __forceinline__ int64_t first_argmax(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  if (ia < 0 || (ib >= 0 && (vb > va || (vb == va && ib < ia)))) return ib;
  return ia;
}

template <bool STATS, typename acc_t>
__device__ __forceinline__ Partial<acc_t> merge(Partial<acc_t> a, Partial<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  Partial<acc_t> out;
  out.m = m;
  // Both sides still at -inf: exp(-inf - -inf) would be nan.
  out.s = m == neg_inf<acc_t>() ? a.s + b.s : a.s * exp_acc(a.m - m) + b.s * exp_acc(b.m - m);
  out.sa = a.sa + b.sa;
  out.saz = a.saz + b.saz;
  if constexpr (STATS) {
    out.pred = first_argmax(a.m, a.pred, b.m, b.pred);
    out.t_max = a.t_max > b.t_max ? a.t_max : b.t_max;
    out.target_pred = first_argmax(a.t_max, a.target_pred, b.t_max, b.target_pred);
  } else {
    out.pred = out.target_pred = -1;
    out.t_max = 0;
  }
  return out;
}

// Absorbs v_j: the max update also records the first argmax (statistics).
template <bool STATS, typename acc_t>
__device__ __forceinline__ void absorb(Partial<acc_t>& p, acc_t x, int64_t j) {
  if (x > p.m) {
    p.s *= exp_acc(p.m - x);
    p.m = x;
    if constexpr (STATS) p.pred = j;
  }
  if (x != neg_inf<acc_t>()) p.s += exp_acc(x - p.m);
}

template <bool STATS, typename acc_t>
__device__ __forceinline__ Partial<acc_t> shfl_xor(const Partial<acc_t>& p, int offset) {
  Partial<acc_t> o = p;
  o.m = __shfl_xor_sync(0xffffffffu, p.m, offset);
  o.s = __shfl_xor_sync(0xffffffffu, p.s, offset);
  o.sa = __shfl_xor_sync(0xffffffffu, p.sa, offset);
  o.saz = __shfl_xor_sync(0xffffffffu, p.saz, offset);
  if constexpr (STATS) {
    o.pred = __shfl_xor_sync(0xffffffffu, static_cast<long long>(p.pred), offset);
    o.t_max = __shfl_xor_sync(0xffffffffu, p.t_max, offset);
    o.target_pred = __shfl_xor_sync(0xffffffffu, static_cast<long long>(p.target_pred), offset);
  }
  return o;
}

// G consecutive threads (G <= 32, or G == blockDim.x) own one row.
template <typename T, int G>
struct GroupWalker {
  using acc_t = typename AccOf<T>::type;
  static constexpr int kVec = 16 / sizeof(T);
  // Groups of up to a warp reduce through shuffles only (larger ones pass a
  // __syncthreads in reduce()).
  static constexpr bool kSyncsWarp = G <= 32;
  int lane;
  int64_t begin, end;  // the columns this group covers

  __device__ __forceinline__ bool leader() const { return lane == 0; }

  // Calls f(j, z_j) for this thread's columns j of a contiguous row z.
  template <typename F>
  __device__ __forceinline__ void each(const T* z, F&& f) const {
    const int64_t body = body_start(z);
    for (int64_t j = begin + lane; j < body; j += G) f(j, to_acc(z[j]));
    const int64_t nvec = (end - body) / kVec;
    const uint4* vec = reinterpret_cast<const uint4*>(z + body);
#pragma unroll 4
    for (int64_t v = lane; v < nvec; v += G) {
      const uint4 raw = vec[v];
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) f(body + v * kVec + k, to_acc(vals[k]));
    }
    for (int64_t j = body + nvec * kVec + lane; j < end; j += G) f(j, to_acc(z[j]));
  }

  // out[j] = f(j, z_j); out may alias z (each element is read, then written, by one thread).
  template <typename F>
  __device__ __forceinline__ void transform(const T* z, T* out, F&& f) const {
    const bool same_phase =
        ((reinterpret_cast<uintptr_t>(z) ^ reinterpret_cast<uintptr_t>(out)) & 15) == 0;
    const int64_t body = same_phase ? body_start(z) : end;
    for (int64_t j = begin + lane; j < body; j += G) out[j] = from_acc<T>(f(j, to_acc(z[j])));
    if (!same_phase) return;
    const int64_t nvec = (end - body) / kVec;
    const uint4* in_vec = reinterpret_cast<const uint4*>(z + body);
    uint4* out_vec = reinterpret_cast<uint4*>(out + body);
#pragma unroll 4
    for (int64_t v = lane; v < nvec; v += G) {
      const uint4 raw = in_vec[v];
      const T* vals = reinterpret_cast<const T*>(&raw);
      uint4 packed;
      T* res = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int k = 0; k < kVec; ++k) res[k] = from_acc<T>(f(body + v * kVec + k, to_acc(vals[k])));
      out_vec[v] = packed;
    }
    for (int64_t j = body + nvec * kVec + lane; j < end; j += G)
      out[j] = from_acc<T>(f(j, to_acc(z[j])));
  }

  template <bool STATS>
  __device__ __forceinline__ Partial<acc_t> reduce(Partial<acc_t> p) const {
    const int width = G < 32 ? G : 32;
    for (int off = width / 2; off > 0; off /= 2) p = merge<STATS>(p, shfl_xor<STATS>(p, off));
    if constexpr (G > 32) {
      __shared__ Partial<acc_t> warp_parts[G / 32];
      const int warp = threadIdx.x / 32;
      __syncthreads();  // warp_parts may still be read from an earlier reduce
      if (threadIdx.x % 32 == 0) warp_parts[warp] = p;
      __syncthreads();
      p = warp_parts[0];
      for (int w = 1; w < G / 32; ++w) p = merge<STATS>(p, warp_parts[w]);
    }
    return p;
  }

 private:
  // The first column at or after `begin` whose address is 16-byte aligned
  // (z is element-aligned); the columns before it are the scalar head.
  __device__ __forceinline__ int64_t body_start(const T* z) const {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(z + begin);
    const int64_t body = begin + static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T));
    return body < end ? body : end;
  }
};

// One thread owns one spatial row; element j is at [j * step].
template <typename T>
struct StridedWalker {
  using acc_t = typename AccOf<T>::type;
  static constexpr bool kSyncsWarp = false;  // one thread per row
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

  template <bool STATS>
  __device__ __forceinline__ Partial<acc_t> reduce(Partial<acc_t> p) const {
    return p;
  }
};

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
  bool active, skip;

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
    skip = !is_active || tgt.ignored || tgt.invalid || p.classes == 0;
  }

  __device__ __forceinline__ acc_t target_at(int64_t j) const {
    return t_acc ? t_acc[j * step] : to_acc(t[j * step]);
  }

  __device__ __forceinline__ acc_t coef(int64_t j) const {
    const acc_t wj = w ? w[j] : acc_t(1);
    if (mode != kProb) return wj;
    return prob_coef<acc_t>(target_at(j), wj, eps, inv_c);
  }

  // Read before any thread of the row writes (the in-place phase overwrites z).
  __device__ __forceinline__ acc_t pivot() const {
    return skip ? acc_t(0) : finite_or_zero(tr.value(to_acc(z[0])));
  }
  __device__ __forceinline__ acc_t v_y() const {
    return (!skip && tgt.y >= 0) ? tr.value(to_acc(z[tgt.y * step])) : acc_t(0);
  }
  __device__ __forceinline__ acc_t fill() const { return tgt.ignored ? acc_t(0) : quiet_nan<acc_t>(); }
};

// This thread's share of the row's online-softmax state (not yet reduced).
template <bool STATS, typename T, int TR, typename Walker>
__device__ __forceinline__ Partial<typename AccOf<T>::type> row_partial(
    const RowContext<T, TR>& row, const Walker& walk, typename AccOf<T>::type pivot) {
  using acc_t = typename AccOf<T>::type;
  Partial<acc_t> part = empty_partial<acc_t>();
  if (!row.skip) {
    walk.each(row.z, [&](int64_t j, acc_t x) {
      const acc_t v = row.tr.value(x);
      absorb<STATS>(part, v, j);
      if (row.mode != kPlain) {
        const acc_t a = row.coef(j);
        part.sa += a;
        part.saz += a * (v - pivot);
      }
      if constexpr (STATS) {
        if (row.mode == kProb) {
          const acc_t t = row.target_at(j);
          if (t > part.t_max || part.target_pred < 0) part.t_max = t, part.target_pred = j;
        }
      }
    });
  }
  return part;
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
    // A row of only -inf (or nan) never updated its argmax: PyTorch's is 0.
    const int64_t pred = part.pred < 0 ? 0 : part.pred;
    p.pred[r] = row.skip ? -1 : pred + p.class_offset;
    if (p.target_pred) {
      const int64_t tp = part.target_pred < 0 ? 0 : part.target_pred;
      p.target_pred[r] = row.skip ? -1 : tp + p.class_offset;
    }
  }
}

// grad = dvalue * (gA p - gk a - [j == y] gy) over the walker's columns
// (row_math.h), with lse = hi + lo.
template <typename T, int TR, typename Walker>
__device__ __forceinline__ void write_grad(const RowContext<T, TR>& row, const Walker& walk,
                                           typename AccOf<T>::type hi, typename AccOf<T>::type lo,
                                           typename AccOf<T>::type scale,
                                           typename AccOf<T>::type sum_a,
                                           typename AccOf<T>::type lse_grad) {
  using acc_t = typename AccOf<T>::type;
  if (!row.active) return;
  if (row.skip) {
    const acc_t fill = row.fill();
    walk.transform(row.z, row.g_out, [&](int64_t, acc_t) { return fill; });
    return;
  }
  const GradCoefs<acc_t> c = grad_coefs(row.tgt, sum_a, scale, lse_grad);
  const int64_t y = row.tgt.y;
  walk.transform(row.z, row.g_out, [&](int64_t j, acc_t x) {
    acc_t slope;
    const acc_t v = row.tr.value_slope(x, slope);
    acc_t d = c.gA * exp_acc((v - hi) - lo);
    if (row.mode != kPlain) d -= c.gk * row.coef(j);
    if (j == y) d -= c.gy;  // folded in fp32, before rounding to the output type
    return TR == kIdentity ? d : d * slope;
  });
}

// What the backward reads back for row r: the saved lse (as hi + lo) and
// the upstream gradients of the loss and the lse; zeros for a row that is skipped.
template <typename T, int TR>
__device__ __forceinline__ void load_saved(const CEParams& p, int64_t r, const RowContext<T, TR>& row,
                                           typename AccOf<T>::type& hi,
                                           typename AccOf<T>::type& lo,
                                           typename AccOf<T>::type& scale,
                                           typename AccOf<T>::type& lse_grad) {
  using acc_t = typename AccOf<T>::type;
  hi = lo = scale = lse_grad = 0;
  if (row.skip) return;
  split_lse(static_cast<const double*>(p.lse)[r], hi, lo);
  scale = static_cast<const acc_t*>(p.grad_output)[r * p.grad_output_stride];
  if (p.grad_lse) lse_grad = static_cast<const acc_t*>(p.grad_lse)[r];
  if (p.lse_grad_scale) lse_grad = *static_cast<const acc_t*>(p.lse_grad_scale) * (hi + lo);
}

// Everything one row does in one phase, with one walker covering the row.
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
      if constexpr (Walker::kSyncsWarp) __syncwarp();
      const acc_t log_s = static_cast<acc_t>(log(part.s));
      const acc_t lse_grad =
          p.lse_grad_scale ? *static_cast<const acc_t*>(p.lse_grad_scale) * (part.m + log_s) : acc_t(0);
      write_grad(row, walk, part.m, log_s, *static_cast<const acc_t*>(p.grad_scale),
                 row_sum_a<acc_t>(p, row.mode, part.sa), lse_grad);
    }
  } else {
    acc_t hi, lo, scale, lse_grad, sa = 0;
    load_saved(p, r, row, hi, lo, scale, lse_grad);
    if (row.mode == kProb) {
      Partial<acc_t> part = empty_partial<acc_t>();
      if (!row.skip) walk.each(row.z, [&](int64_t j, acc_t) { part.sa += row.coef(j); });
      sa = walk.template reduce<false>(part).sa;
    }
    write_grad(row, walk, hi, lo, scale, row_sum_a<acc_t>(p, row.mode, sa), lse_grad);
  }
}

template <int G>
constexpr int block_threads() {
  return G > 256 ? G : 256;
}

template <typename T, int G, int PHASE, int TR, bool STATS>
__global__ void __launch_bounds__(block_threads<G>()) rows_kernel(const CEParams p) {
  constexpr int kGroups = block_threads<G>() / G;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / G;
  GroupWalker<T, G> walk{static_cast<int>(threadIdx.x % G), 0, p.classes};
  process_row<T, PHASE, TR, STATS>(p, r, r < p.rows, walk);
}

template <typename T, int PHASE, int TR, bool STATS>
__global__ void __launch_bounds__(256) spatial_kernel(const CEParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.rows) return;
  process_row<T, PHASE, TR, STATS>(p, r, true, StridedWalker<T>{p.classes, p.inner});
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
// block. `scale` is read at grad_output[r * grad_output_stride].
template <typename T, int TR>
__global__ void __launch_bounds__(kSplitThreads) split_grad_kernel(const CEParams p, int splits,
                                                                  int64_t chunk) {
  using acc_t = typename AccOf<T>::type;
  int64_t r;
  const GroupWalker<T, kSplitThreads> walk = chunk_walker<T>(p, splits, chunk, r);
  const RowContext<T, TR> row(p, r, true);
  acc_t hi, lo, scale, lse_grad;
  load_saved(p, r, row, hi, lo, scale, lse_grad);
  write_grad(row, walk, hi, lo, scale, row_sum_a<acc_t>(p, row.mode, acc_t(0)), lse_grad);
}

template <typename T>
__global__ void __launch_bounds__(256) scale_kernel(const CEParams p) {
  using acc_t = typename AccOf<T>::type;
  const auto* g = static_cast<const acc_t*>(p.grad_output);
  // The usual loss.backward() of a mean or sum: nothing to do, and no host
  // sync to find that out.
  if (p.grad_output_stride == 0 && g[0] == acc_t(1)) return;
  const int64_t total = p.rows * p.classes;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / (p.classes * p.inner);
    const int64_t rest = e % (p.classes * p.inner);
    const int64_t j = rest / p.inner, s = rest % p.inner;
    T& v = static_cast<T*>(p.grad)[n * p.grad_outer_stride + j * p.inner + s];
    v = from_acc<T>(to_acc(v) * g[(n * p.inner + s) * p.grad_output_stride]);
  }
}

int sm_count() {
  static const int count = [] {
    int device = 0, n = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }();
  return count;
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
    spatial_kernel<T, PHASE, TR, STATS><<<grid_of((p.rows + 255) / 256), 256, 0, stream>>>(p);
  } else if (p.classes <= 2048) {
    rows_kernel<T, 32, PHASE, TR, STATS><<<grid_of((p.rows + 7) / 8), 256, 0, stream>>>(p);
  } else if (p.classes <= 32768) {
    rows_kernel<T, 256, PHASE, TR, STATS><<<grid_of(p.rows), 256, 0, stream>>>(p);
  } else {
    rows_kernel<T, 1024, PHASE, TR, STATS><<<grid_of(p.rows), 1024, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int TR>
void launch_split_grad(const CEParams& p, Split split, cudaStream_t stream) {
  split_grad_kernel<T, TR><<<grid_of(p.rows * split.splits), kSplitThreads, 0, stream>>>(
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
  split_stats_kernel<T, TR, STATS><<<grid_of(p.rows * split.splits), kSplitThreads, 0, stream>>>(
      p, split.splits, split.chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  split_finish_kernel<T, TR, STATS><<<grid_of((p.rows + 255) / 256), 256, 0, stream>>>(p, split.splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (write_grad) {
    // In place: the gradient pass reads the logits a second time (and the
    // lse that split_finish wrote, for the z-loss term).
    CEParams g = p;
    g.grad_output = p.grad_scale;
    g.grad_output_stride = 0;
    launch_split_grad<T, TR>(g, backward_split(g), stream);
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

template <typename T>
void launch_backward(const CEParams& p, cudaStream_t stream) {
  const Split split = backward_split(p);
  by_transform(p, [&](auto tr) {
    constexpr int TR = decltype(tr)::value;
    if (split.splits == 1)
      launch_rows<T, kBackward, TR, false>(p, stream);
    else
      launch_split_grad<T, TR>(p, split, stream);
  });
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
  const int64_t needed = (p.rows * p.classes + 255) / 256;
  const int64_t wave = 4 * static_cast<int64_t>(sm_count());
  const unsigned blocks = grid_of(needed < wave ? needed : wave);
  by_dtype(p.dtype, [&](auto tag) {
    scale_kernel<decltype(tag)><<<blocks, 256, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fsce::cuda
