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
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../launch_plan.h"
#include "../row_math.h"
#include "kernels.h"
#include "launch.h"

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

// ex2.approx.ftz: exp2f without its fix-up for denormal results (below
// 1.2e-38, which a softmax term may round to 0); the same 2-ulp accuracy.
__device__ __forceinline__ float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * kLog2e));
  return y;
#else  // the CPU emulation (tools/cuda_emu)
  return exp2f(x * kLog2e);
#endif
}
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

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

// torch.argmax's order: nan above every number, so that the first nan wins.
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t x, acc_t y) {
  return x > y || (x != x && y == y);
}

// The first argmax of two halves: the larger value, the lower index on a tie.
template <typename acc_t>
__device__ __forceinline__ int64_t first_argmax(acc_t va, int64_t ia, acc_t vb, int64_t ib) {
  const bool tie = vb == va || (vb != vb && va != va);
  if (ia < 0 || (ib >= 0 && (beats(vb, va) || (tie && ib < ia)))) return ib;
  return ia;
}

template <bool STATS, typename acc_t>
__device__ __forceinline__ Partial<acc_t> merge(Partial<acc_t> a, Partial<acc_t> b) {
  // With statistics a nan max stays (it is the argmax); the sum is nan either way.
  const acc_t m = (STATS ? beats(a.m, b.m) : a.m > b.m) ? a.m : b.m;
  Partial<acc_t> out;
  out.m = m;
  // Both sides still at -inf: exp(-inf - -inf) would be nan.
  out.s = m == neg_inf<acc_t>() ? a.s + b.s : a.s * exp_acc(a.m - m) + b.s * exp_acc(b.m - m);
  out.sa = a.sa + b.sa;
  out.saz = a.saz + b.saz;
  if constexpr (STATS) {
    out.pred = first_argmax(a.m, a.pred, b.m, b.pred);
    out.t_max = beats(a.t_max, b.t_max) ? a.t_max : b.t_max;
    out.target_pred = first_argmax(a.t_max, a.target_pred, b.t_max, b.target_pred);
  } else {
    out.pred = out.target_pred = -1;
    out.t_max = 0;
  }
  return out;
}

// Absorbs v_j .. v_{j+N-1}. Without statistics: one rescale per N values
// (against their max), one exp per value. With them, value by value, so that
// the max update records the first argmax (a nan included, as torch.argmax).
template <bool STATS, int N, typename acc_t>
__device__ __forceinline__ void absorb(Partial<acc_t>& p, const acc_t (&v)[N], int64_t j) {
  if constexpr (STATS) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (v[k] > p.m || (v[k] != v[k] && p.m == p.m)) {
        p.s *= exp_acc(p.m - v[k]);
        p.m = v[k];
        p.pred = j + k;
      }
      if (v[k] != neg_inf<acc_t>()) p.s += exp_acc(v[k] - p.m);
    }
  } else {
    acc_t cm = v[0];  // fmax skips nan: a nan reaches the sum below
#pragma unroll
    for (int k = 1; k < N; ++k) cm = max_acc(cm, v[k]);
    if (cm > p.m) {
      p.s *= exp_acc(p.m - cm);
      p.m = cm;
    }
    // While only -inf has been seen, shift by 0: exp(-inf - -inf) would be nan.
    const acc_t shift = p.m == neg_inf<acc_t>() ? acc_t(0) : p.m;
#pragma unroll
    for (int k = 0; k < N; ++k) p.s += exp_acc(v[k] - shift);
  }
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

// N consecutive values of a row, in acc_t.
template <typename acc_t, int N>
struct Values {
  acc_t x[N];
  static constexpr int size = N;
};

// A load of VB bytes (16 or 8).
template <int VB>
using VecOf = std::conditional_t<VB == 16, uint4, uint2>;

// The values of one vector load of T, in acc_t.
template <typename T, typename V>
__device__ __forceinline__ Values<typename AccOf<T>::type, sizeof(V) / sizeof(T)> unpack(V raw) {
  constexpr int kVec = sizeof(V) / sizeof(T);
  const T* vals = reinterpret_cast<const T*>(&raw);
  Values<typename AccOf<T>::type, kVec> x;
#pragma unroll
  for (int k = 0; k < kVec; ++k) x.x[k] = to_acc(vals[k]);
  return x;
}

// p[0], p[step], .. p[(N - 1) * step] in the accumulation type: one vector
// load where the values are contiguous and 8- or 16-byte aligned, else N
// scalar loads.
template <int N, typename U>
__device__ __forceinline__ Values<typename AccOf<U>::type, N> load_values(const U* p, int64_t step) {
  constexpr int kBytes = N * sizeof(U);
  if constexpr (N > 1 && (kBytes == 8 || kBytes == 16)) {
    if (step == 1 && reinterpret_cast<uintptr_t>(p) % kBytes == 0)
      return unpack<U>(*reinterpret_cast<const VecOf<kBytes>*>(p));
  }
  Values<typename AccOf<U>::type, N> x;
#pragma unroll
  for (int k = 0; k < N; ++k) x.x[k] = to_acc(p[k * step]);
  return x;
}

// G consecutive threads (G <= 32, or G == blockDim.x) own one row.
// CACHED: each() also keeps its vectors in `cache` (shared memory, when not
// null) and transform() reads them from there, so that a row read once is
// written once; a thread reads back only the vectors it stored (the same
// columns in both passes), so no barrier is needed.
template <typename T, int G, bool CACHED = false>
struct GroupWalker {
  using acc_t = typename AccOf<T>::type;
  // Groups of up to a warp reduce through shuffles only (larger ones pass a
  // __syncthreads in reduce()).
  static constexpr bool syncs_warp() { return G <= 32; }
  int lane;
  int64_t begin, end;  // the columns this group covers
  void* cache = nullptr;  // CACHED: room for the row's vectors, or null

  __device__ __forceinline__ bool leader() const { return lane == 0; }

  // Calls f(j, x) for this thread's columns of a contiguous row z, where x
  // holds z_j .. z_{j+N-1} in acc_t: N = VB / sizeof(T) in the vector body
  // (loads of VB bytes, U in flight), 1 in the scalar head and tail.
  template <int U, int VB, typename F>
  __device__ __forceinline__ void each(const T* z, F&& f) const {
    constexpr int kVec = VB / sizeof(T);
    const int64_t body = body_start(z);
    for (int64_t j = begin + lane; j < body; j += G) f(j, scalar(z[j]));
    const int64_t nvec = (end - body) / kVec;
    const auto* vec = reinterpret_cast<const VecOf<VB>*>(z + body);
#pragma unroll U
    for (int64_t v = lane; v < nvec; v += G) {
      const VecOf<VB> raw = vec[v];
      if constexpr (CACHED) {
        if (cache) static_cast<VecOf<VB>*>(cache)[v] = raw;
      }
      f(body + v * kVec, unpack<T>(raw));
    }
    for (int64_t j = body + nvec * kVec + lane; j < end; j += G) f(j, scalar(z[j]));
  }

  // Calls f(j) for this thread's columns, reading nothing.
  template <typename F>
  __device__ __forceinline__ void columns(F&& f) const {
    for (int64_t j = begin + lane; j < end; j += G) f(j);
  }

  // out[j..j+N) = f(j, x) (N values in acc_t, x as in each()); out may alias
  // z (each element is read, then written, by one thread).
  template <int U, int VB, typename F>
  __device__ __forceinline__ void transform(const T* z, T* out, F&& f) const {
    constexpr int kVec = VB / sizeof(T);
    const bool same_phase =
        ((reinterpret_cast<uintptr_t>(z) ^ reinterpret_cast<uintptr_t>(out)) & 15) == 0;
    const int64_t body = same_phase ? body_start(z) : end;
    for (int64_t j = begin + lane; j < body; j += G) out[j] = from_acc<T>(f(j, scalar(z[j])).x[0]);
    if (!same_phase) return;
    const int64_t nvec = (end - body) / kVec;
    const auto* in_vec = reinterpret_cast<const VecOf<VB>*>(z + body);
    auto* out_vec = reinterpret_cast<VecOf<VB>*>(out + body);
#pragma unroll U
    for (int64_t v = lane; v < nvec; v += G) {
      VecOf<VB> raw;
      if constexpr (CACHED)
        raw = cache ? static_cast<const VecOf<VB>*>(cache)[v] : in_vec[v];
      else
        raw = in_vec[v];
      const Values<acc_t, kVec> d = f(body + v * kVec, unpack<T>(raw));
      VecOf<VB> packed;
      T* res = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int k = 0; k < kVec; ++k) res[k] = from_acc<T>(d.x[k]);
      out_vec[v] = packed;
    }
    for (int64_t j = body + nvec * kVec + lane; j < end; j += G)
      out[j] = from_acc<T>(f(j, scalar(z[j])).x[0]);
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
  __device__ __forceinline__ static Values<acc_t, 1> scalar(T z) { return {{to_acc(z)}}; }

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
  static constexpr bool syncs_warp() { return false; }  // one thread per row
  int64_t C, step;

  __device__ __forceinline__ bool leader() const { return true; }

  // Calls f(j, x) with x = z_j .. z_{j+K-1}: K = VB / sizeof(T) strided
  // elements gathered (1 for float64), so that the forward rescales once per
  // K; U groups in flight.
  template <int U, int VB, typename F>
  __device__ __forceinline__ void each(const T* z, F&& f) const {
    constexpr int K = group<VB>();
    int64_t j = 0;
#pragma unroll U
    for (; j + K <= C; j += K) f(j, gather<K>(z, j));
    for (; j < C; ++j) f(j, gather<1>(z, j));
  }

  template <typename F>
  __device__ __forceinline__ void columns(F&& f) const {
    for (int64_t j = 0; j < C; ++j) f(j);
  }

  template <int U, int VB, typename F>
  __device__ __forceinline__ void transform(const T* z, T* out, F&& f) const {
    constexpr int K = group<VB>();
    int64_t j = 0;
#pragma unroll U
    for (; j + K <= C; j += K) scatter(out, j, f(j, gather<K>(z, j)));
    for (; j < C; ++j) scatter(out, j, f(j, gather<1>(z, j)));
  }

  template <bool STATS>
  __device__ __forceinline__ Partial<acc_t> reduce(Partial<acc_t> p) const {
    return p;
  }

 private:
  template <int VB>
  __device__ __forceinline__ static constexpr int group() {
    return sizeof(T) == 8 ? 1 : VB / static_cast<int>(sizeof(T));
  }

  template <int K>
  __device__ __forceinline__ Values<acc_t, K> gather(const T* z, int64_t j) const {
    Values<acc_t, K> x;
#pragma unroll
    for (int k = 0; k < K; ++k) x.x[k] = to_acc(z[(j + k) * step]);
    return x;
  }

  template <int K>
  __device__ __forceinline__ void scatter(T* out, int64_t j, const Values<acc_t, K>& d) const {
#pragma unroll
    for (int k = 0; k < K; ++k) out[(j + k) * step] = from_acc<T>(d.x[k]);
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
  bool active, skip, empty;

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
    skip = !is_active || tgt.ignored || tgt.invalid;
    empty = p.classes == 0;  // a shard without classes: lse = -inf, as on the CPU
  }

  // t_j .. t_{j+N-1} of a probability target, and a_j .. a_{j+N-1} (w_j
  // for index targets), each array read with vector loads where it can be.
  template <int N>
  __device__ __forceinline__ Values<acc_t, N> targets(int64_t j) const {
    return t_acc ? load_values<N>(t_acc + j * step, step) : load_values<N>(t + j * step, step);
  }
  template <int N>
  __device__ __forceinline__ Values<acc_t, N> coefs(int64_t j) const {
    Values<acc_t, N> a;
    if (w) {
      a = load_values<N>(w + j, 1);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) a.x[k] = 1;
    }
    if (mode != kProb) return a;
    const Values<acc_t, N> tj = targets<N>(j);
#pragma unroll
    for (int k = 0; k < N; ++k) a.x[k] = prob_coef<acc_t>(tj.x[k], a.x[k], eps, inv_c);
    return a;
  }
  __device__ __forceinline__ acc_t coef(int64_t j) const { return coefs<1>(j).x[0]; }

  // Read before any thread of the row writes (the in-place phase overwrites z).
  __device__ __forceinline__ acc_t pivot() const {
    return skip || empty ? acc_t(0) : finite_or_zero(tr.value(to_acc(z[0])));
  }
  __device__ __forceinline__ bool has_y() const { return !skip && tgt.y >= 0; }
  // z_y as stored (before the transform), 0 without a target column here.
  __device__ __forceinline__ acc_t z_y() const { return has_y() ? to_acc(z[tgt.y * step]) : acc_t(0); }
  __device__ __forceinline__ acc_t v_y() const { return has_y() ? tr.value(z_y()) : acc_t(0); }
  __device__ __forceinline__ acc_t fill() const { return tgt.ignored ? acc_t(0) : quiet_nan<acc_t>(); }
};

// Loads in flight per thread in a row pass, and their bytes: plain rows
// keep two 16-byte loads in flight (one for float64, whose exp is long);
// rows with coefficients (weights, smoothing, probabilities) read a weight
// or target per element and take one 8-byte load at a time, so that their
// loops do not spill.
template <typename T, bool GENERAL>
constexpr int unroll_of() {
  return GENERAL || sizeof(T) == 8 ? 1 : 2;
}
template <bool GENERAL>
constexpr int vec_bytes_of() {
  return GENERAL ? 8 : 16;
}

// This thread's share of the row's online-softmax state (not yet reduced).
// GENERAL: the row's mode is not kPlain (a loop of its own, so that plain
// rows pay nothing for coefficients).
template <bool STATS, bool GENERAL, typename T, int TR, typename Walker>
__device__ __forceinline__ Partial<typename AccOf<T>::type> row_pass(
    const RowContext<T, TR>& row, const Walker& walk, typename AccOf<T>::type pivot) {
  using acc_t = typename AccOf<T>::type;
  Partial<acc_t> part = empty_partial<acc_t>();
  walk.template each<unroll_of<T, GENERAL>(), vec_bytes_of<GENERAL>()>(row.z, [&](int64_t j, const auto& x) {
    constexpr int N = std::remove_reference_t<decltype(x)>::size;
    acc_t v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = row.tr.value(x.x[k]);
    absorb<STATS>(part, v, j);
    if constexpr (GENERAL) {
      const Values<acc_t, N> a = row.template coefs<N>(j);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        part.sa += a.x[k];
        part.saz += a.x[k] * (v[k] - pivot);
      }
      if constexpr (STATS) {
        if (row.mode == kProb) {
          const Values<acc_t, N> t = row.template targets<N>(j);
#pragma unroll
          for (int k = 0; k < N; ++k)
            if (beats(t.x[k], part.t_max) || part.target_pred < 0) part.t_max = t.x[k], part.target_pred = j + k;
        }
      }
    }
  });
  return part;
}

template <bool STATS, typename T, int TR, typename Walker>
__device__ __forceinline__ Partial<typename AccOf<T>::type> row_partial(
    const RowContext<T, TR>& row, const Walker& walk, typename AccOf<T>::type pivot) {
  if (row.skip) return empty_partial<typename AccOf<T>::type>();
  if (row.mode == kPlain) return row_pass<STATS, false>(row, walk, pivot);
  return row_pass<STATS, true>(row, walk, pivot);
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
    // A row of only -inf never updated its argmax: PyTorch's is 0.
    const bool none = row.skip || row.empty;
    p.pred[r] = none ? -1 : (part.pred < 0 ? 0 : part.pred) + p.class_offset;
    if (p.target_pred)
      p.target_pred[r] = none ? -1 : (part.target_pred < 0 ? 0 : part.target_pred) + p.class_offset;
  }
}

// gA * p_j for z_j, with lse = hi + lo, and dvalue(z_j) in `slope`.
template <int TR, typename acc_t>
__device__ __forceinline__ acc_t softmax_grad(const LogitTransform<TR, acc_t>& tr, acc_t z, acc_t hi,
                                              acc_t lo, acc_t gA, acc_t& slope) {
  return gA * exp_acc((tr.value_slope(z, slope) - hi) - lo);
}

// grad = dvalue * (gA p - gk a - [j == y] gy) over the walker's columns
// (row_math.h), with lse = hi + lo; GENERAL as in row_pass.
template <bool GENERAL, typename T, int TR, typename Walker>
__device__ __forceinline__ void grad_pass(const RowContext<T, TR>& row, const Walker& walk,
                                          typename AccOf<T>::type hi, typename AccOf<T>::type lo,
                                          const GradCoefs<typename AccOf<T>::type>& c) {
  using acc_t = typename AccOf<T>::type;
  const int64_t y = row.tgt.y;
  walk.template transform<unroll_of<T, GENERAL>(), vec_bytes_of<GENERAL>()>(row.z, row.g_out, [&](int64_t j, const auto& x) {
    constexpr int N = std::remove_reference_t<decltype(x)>::size;
    // The target's slot in these N columns, or -1 (one 64-bit test per vector).
    const int ky = static_cast<uint64_t>(y - j) < static_cast<uint64_t>(N) ? static_cast<int>(y - j) : -1;
    [[maybe_unused]] Values<acc_t, N> a;
    if constexpr (GENERAL) a = row.template coefs<N>(j);
    Values<acc_t, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      acc_t slope;
      acc_t d = softmax_grad(row.tr, x.x[k], hi, lo, c.gA, slope);
      if constexpr (GENERAL) d -= c.gk * a.x[k];
      if (k == ky) d -= c.gy;  // folded in fp32, before rounding to the output type
      out.x[k] = TR == kIdentity ? d : d * slope;
    }
    return out;
  });
}

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
    walk.template transform<1, 16>(row.z, row.g_out, [&](int64_t, const auto& x) {
      Values<acc_t, std::remove_reference_t<decltype(x)>::size> out;
#pragma unroll
      for (int k = 0; k < out.size; ++k) out.x[k] = fill;
      return out;
    });
    return;
  }
  const GradCoefs<acc_t> c = grad_coefs(row.tgt, sum_a, scale, lse_grad);
  if (row.mode == kPlain)
    grad_pass<false>(row, walk, hi, lo, c);
  else
    grad_pass<true>(row, walk, hi, lo, c);
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

// The in-place forward's counterpart of load_saved, from the row's reduced
// partial: lse = m + log s (as hi + lo), the gradient's scale and the lse
// gradient.
template <typename acc_t>
__device__ __forceinline__ void inplace_saved(const CEParams& p, const Partial<acc_t>& part, acc_t& hi,
                                              acc_t& lo, acc_t& scale, acc_t& lse_grad) {
  hi = part.m;
  lo = static_cast<acc_t>(log(part.s));
  scale = *static_cast<const acc_t*>(p.grad_scale);
  lse_grad = p.lse_grad_scale ? *static_cast<const acc_t*>(p.lse_grad_scale) * (hi + lo) : acc_t(0);
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
      if constexpr (Walker::syncs_warp()) __syncwarp();
      acc_t hi, lo, scale, lse_grad;
      inplace_saved(p, part, hi, lo, scale, lse_grad);
      write_grad(row, walk, hi, lo, scale, row_sum_a<acc_t>(p, row.mode, part.sa), lse_grad);
    }
  } else {
    acc_t hi, lo, scale, lse_grad, sa = 0;
    load_saved(p, r, row, hi, lo, scale, lse_grad);
    if (row.mode == kProb) {
      Partial<acc_t> part = empty_partial<acc_t>();
      if (!row.skip) walk.columns([&](int64_t j) { part.sa += row.coef(j); });
      sa = walk.template reduce<false>(part).sa;
    }
    write_grad(row, walk, hi, lo, scale, row_sum_a<acc_t>(p, row.mode, sa), lse_grad);
  }
}

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

template <typename T, int PHASE, int TR, bool STATS>
__global__ void __launch_bounds__(256) spatial_kernel(const CEParams p) {
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
      load_saved(p, r0 + k, row, hi[k], lo[k], scale, lse_grad);
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
        inplace_saved(p, part[k], hi[k], lo[k], scale, lse_grad);
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
        const acc_t d = softmax_grad(tr, x.x[k], hi[k], lo[k], c[k].gA, slope);
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
        const acc_t d = softmax_grad(tr, z_y[k], hi[k], lo[k], c[k].gA, slope) - c[k].gy;
        g[k + row.tgt.y * S] = from_acc<T>(TR == kIdentity ? d : d * slope);
      }
    }
  }
}

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

template <typename T, int TR>
void launch_split_grad(const CEParams& p, Split split, cudaStream_t stream) {
  FSCE_LAUNCH((split_grad_kernel<T, TR>), grid_of(p.rows * split.splits), kSplitThreads, 0, stream)(
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
