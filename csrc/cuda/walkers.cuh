// Memory walkers: how a kernel's threads cover one row and load it. A
// GroupWalker is G threads over a contiguous row (16-byte vectors after an
// aligning scalar head); a StridedWalker is one thread over a spatial row.
#pragma once
#include "reduce.cuh"

namespace fsce::cuda {
// Included by kernels.cu alone (one translation unit): internal linkage.
namespace {

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

}  // namespace
}  // namespace fsce::cuda
