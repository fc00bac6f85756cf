// Fused softmax cross-entropy on the CPU.
//
// Contiguous rows (inner == 1) of float/bf16/fp16 take the 8-lane SIMD path:
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
#include <memory>
#include <type_traits>

#include "../row_math.h"
#include "simd.h"

namespace fsce::cpu {
namespace {

// A row's pass over v: max m, log_s = log sum exp(v - m), the a_j sums, and
// (with stats) the first argmax of v and of a probability target.
template <typename acc_t>
struct Stats {
  acc_t m, log_s, sum_a, sum_az;
  int64_t pred, target_pred;
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
    if (count == kLanes) return acc ? loadv(acc + j) : loadv(own + j);
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
  using acc_t = typename AccOf<T>::type;
  const RowOffsets off = row_offsets(p, r);
  Row<T> row;
  row.z = static_cast<const T*>(p.logits) + off.logits;
  row.t = {nullptr, nullptr};
  if (p.target_prob && p.target_prob_acc)
    row.t.acc = static_cast<const acc_t*>(p.target_prob) + off.target;
  else if (p.target_prob)
    row.t.own = static_cast<const T*>(p.target_prob) + off.target;
  row.g = p.grad ? static_cast<T*>(p.grad) + off.grad : nullptr;
  row.step = p.inner;
  return row;
}

// What every row of a launch shares: the class weights, eps, 1/C, the
// transform, whether the argmax statistics are wanted, whether the values are
// bounded (see absorb_bounded), and the softcap's tanh table or nullptr (see
// fill_tanh_table).
template <typename acc_t, int TR>
struct Recipe {
  const acc_t* w;
  acc_t eps, inv_c;
  LogitTransform<TR, acc_t> tr;
  bool stats, bounded;
  const float* tanh_table;
};

// Softcapped values lie in [-cap, cap]; for cap <= 43, exp(v - cap) >=
// exp(-2 cap) is still a normal float.
constexpr double kMaxBoundedCap = 43.0;

template <typename acc_t, int TR>
FSCE_VINLINE Recipe<acc_t, TR> recipe_of(const CEParams& p, const float* tanh_table) {
  return {static_cast<const acc_t*>(p.weight), static_cast<acc_t>(p.label_smoothing),
          acc_t(1) / static_cast<acc_t>(p.total_classes), logit_transform<TR, acc_t>(p),
          p.pred != nullptr, TR == kSoftcap && p.softcap <= kMaxBoundedCap, tanh_table};
}

// ---------------------------------------------------------------- scalar path

template <typename T, typename acc_t, int TR>
FSCE_VINLINE acc_t coef_scalar(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t j, int mode) {
  const acc_t wj = rc.w ? rc.w[j] : acc_t(1);
  if (mode != kProb) return wj;
  return prob_coef<acc_t>(row.t.at(j * row.step), wj, rc.eps, rc.inv_c);
}

template <typename T, typename acc_t, int TR>
FSCE_VINLINE Stats<acc_t> stats_scalar(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C,
                                       int mode, acc_t pivot) {
  acc_t m = -std::numeric_limits<acc_t>::infinity(), t_max = m;
  int64_t pred = C > 0 ? 0 : -1, target_pred = pred;
  for (int64_t j = 0; j < C; ++j) {
    const acc_t v = rc.tr.value(static_cast<acc_t>(row.z[j * row.step]));
    if (v > m || v != v) {
      if (m == m) pred = j;  // the first nan, or the first strict maximum
      m = v;
    }
    if (rc.stats && mode == kProb) {
      const acc_t t = row.t.at(j * row.step);
      if (t > t_max) t_max = t, target_pred = j;
    }
  }
  const acc_t shift = std::isinf(m) && m < 0 ? acc_t(0) : m;
  acc_t s = 0, sa = 0, saz = 0;
  for (int64_t j = 0; j < C; ++j) {
    const acc_t v = rc.tr.value(static_cast<acc_t>(row.z[j * row.step]));
    s += std::exp(v - shift);
    if (mode != kPlain) {
      const acc_t a = coef_scalar(row, rc, j, mode);
      sa += a;
      saz += a * (v - pivot);
    }
  }
  return {m, std::log(s), sa, saz, pred, target_pred};
}

template <typename T, typename acc_t, int TR>
FSCE_VINLINE acc_t sum_coef_scalar(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C) {
  acc_t sa = 0;
  for (int64_t j = 0; j < C; ++j) sa += coef_scalar(row, rc, j, kProb);
  return sa;
}

template <typename T, typename acc_t, int TR>
FSCE_VINLINE void grad_scalar(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C, int mode,
                              acc_t lse_hi, acc_t lse_lo, GradCoefs<acc_t> c, int64_t y) {
  for (int64_t j = 0; j < C; ++j) {
    acc_t slope;
    const acc_t v = rc.tr.value_slope(static_cast<acc_t>(row.z[j * row.step]), slope);
    acc_t d = c.gA * std::exp((v - lse_hi) - lse_lo);
    if (mode != kPlain) d -= c.gk * coef_scalar(row, rc, j, mode);
    if (j == y) d -= c.gy;
    row.g[j * row.step] = static_cast<T>(TR == kIdentity ? d : d * slope);
  }
}

// ------------------------------------------------------------------ SIMD path

FSCE_VINLINE vint lane_ids() { return vint{0, 1, 2, 3, 4, 5, 6, 7}; }

// The softcap's t = tanh(scale * z / cap); v = cap * t, dv/dz = scale * (1 - t^2).
FSCE_VINLINE vfloat softcap_tanh(const LogitTransform<kSoftcap, float>& tr, vfloat z) {
  return tanhv(z * (tr.scale * tr.inv_cap));
}

FSCE_VINLINE vfloat softcap_slope(const LogitTransform<kSoftcap, float>& tr, vfloat t) {
  return tr.scale * (1.f - t * t);
}

FSCE_VINLINE vfloat softcap_of_tanh(const LogitTransform<kSoftcap, float>& tr, vfloat t, vfloat* slope) {
  if (slope) *slope = softcap_slope(tr, t);
  return tr.cap * t;
}

// The logit transform on a vector.
template <int TR>
FSCE_VINLINE vfloat vec_value_slope(const LogitTransform<TR, float>& tr, vfloat z, vfloat* slope) {
  if constexpr (TR == kIdentity) {
    return z;
  } else if constexpr (TR == kScale) {
    if (slope) *slope = splat(tr.scale);
    return z * tr.scale;
  } else {
    return softcap_of_tanh(tr, softcap_tanh(tr, z), slope);
  }
}


// For 16-bit logits the softcap's tanh depends on 16 bits only, so a launch
// with many elements computes it once per bit pattern (65536 floats), with
// the same vector code as the rows (so results do not depend on the table),
// and the rows look it up: the tanh cost as much as the rest of a pass.
constexpr int64_t kTanhTableSize = 65536;

template <typename T>
FSCE_VINLINE void fill_tanh_table(const CEParams& p, float* table) {
  const LogitTransform<kSoftcap, float> tr = logit_transform<kSoftcap, float>(p);
  for (int64_t b = 0; b < kTanhTableSize; b += kLanes) {
    T z[kLanes];
    for (int l = 0; l < kLanes; ++l) z[l] = T(static_cast<uint16_t>(b + l), T::from_bits());
    storev(table + b, softcap_tanh(tr, loadv(z)));
  }
}

// The values (and slopes) of kLanes logits from z, `count` of them in the
// row (the rest read as 0).
template <typename T, int TR>
FSCE_VINLINE vfloat load_value_slope(const Recipe<float, TR>& rc, const T* z, int count, vfloat* slope) {
  if constexpr (TR == kSoftcap && sizeof(T) == 2) {
    if (rc.tanh_table) {
      vfloat t;
      for (int l = 0; l < kLanes; ++l) t[l] = rc.tanh_table[l < count ? z[l].x : 0];
      return softcap_of_tanh(rc.tr, t, slope);
    }
  }
  return vec_value_slope<TR>(rc.tr, count == kLanes ? loadv(z) : load_partial(z, count, 0.f), slope);
}

template <typename T, int TR>
FSCE_VINLINE vfloat load_value(const Recipe<float, TR>& rc, const T* z, int count = kLanes) {
  return load_value_slope<T, TR>(rc, z, count, nullptr);
}

// a_j for kLanes classes starting at j; lanes at or past `count` are 0.
template <typename T, int MODE>
FSCE_VINLINE vfloat coef_vec(Probs<T> t, const float* w, int64_t j, int count, float eps, float inv_c) {
  const bool full = count == kLanes;
  vfloat a = w ? (full ? loadv(w + j) : load_partial(w + j, count, 0.f)) : splat(1.f);
  if constexpr (MODE == kProb) a = a * ((1.f - eps) * t.vec(j, count) + eps * inv_c);
  return full ? a : (lane_ids() < count ? a : vfloat{});
}

// Vectors per chunk of the statistics pass: plain rows take 8, so that the
// running max's rescale is paid once per 64 values; rows with coefficients
// take 4, which keeps their loop in registers.
template <int MODE>
constexpr int kChunk = MODE == kPlain ? 8 : 4;

template <int NV>
FSCE_VINLINE vfloat chunk_max(const vfloat (&x)[NV]) {
  vfloat cm = x[0];
  for (int k = 1; k < NV; ++k) cm = vmax(cm, x[k]);
  return cm;
}

// Folds NV vectors into the per-lane running max and rescaled sum: one
// rescale per NV vectors, one exp2 per element. Returns the chunk's max.
template <int NV>
FSCE_VINLINE vfloat absorb(vfloat& m, vfloat& s, const vfloat (&x)[NV]) {
  const vfloat cm = chunk_max(x);
  const vfloat nm = vmax(m, cm);
  // A lane that has seen only -inf keeps shift 0, so that exp2 sees -inf, not nan.
  const vfloat shift = nm == -std::numeric_limits<float>::infinity() ? vfloat{} : nm;
  vfloat acc = s * exp2v((m - shift) * kLog2e);
  for (int k = 0; k < NV; ++k) acc += exp2v((x[k] - shift) * kLog2e);
  s = acc;
  m = nm;
  return cm;
}

// The same for values bounded by `shift` (a softcapped row's cap): no
// running max and no rescale; lanes at or past `count` add nothing.
template <int NV>
FSCE_VINLINE vfloat absorb_bounded(vfloat& s, vfloat shift, const vfloat (&x)[NV], int count = kLanes) {
  vfloat acc = exp2v((x[0] - shift) * kLog2e);
  for (int k = 1; k < NV; ++k) acc += exp2v((x[k] - shift) * kLog2e);
  s += count == kLanes ? acc : (lane_ids() < count ? acc : vfloat{});
  return chunk_max(x);
}

// Per-lane first argmax at chunk granularity, for the statistics: a lane
// remembers the first chunk (of `vectors` vectors) whose maximum beat its own;
// first() then finds the element inside that chunk. A compare and two blends
// per chunk, not per element. (A nan row is resolved by stats_vec.)
struct ChunkArgmax {
  vfloat m = splat(-std::numeric_limits<float>::infinity());
  vint base = vint{} - 1;

  FSCE_VINLINE void update(vfloat cm, int64_t j) {
    const vint gt = cm > m;
    m = gt ? cm : m;
    base = gt ? vint{} + static_cast<int>(j) : base;
  }

  // The lowest class index holding the row's maximum; value_at(i) recomputes
  // element i as the pass saw it (an always_inline callable, so that it is
  // compiled for the clone's ISA, FMA contraction included, as the pass was).
  template <typename ValueAt>
  FSCE_VINLINE int64_t first(int64_t C, int vectors, ValueAt value_at) const {
    const float top = hmax(m);
    int64_t best = -1;
    for (int l = 0; l < kLanes; ++l) {
      if (m[l] != top || base[l] < 0) continue;
      int64_t found = -1;
      float found_v = -std::numeric_limits<float>::infinity();
      for (int k = 0; k < vectors; ++k) {
        const int64_t i = int64_t(base[l]) + k * kLanes + l;
        if (i >= C) break;
        const float v = value_at(i);
        if (v > found_v || found < 0) found = i, found_v = v;
        if (v == top) break;
      }
      if (found >= 0 && (best < 0 || found < best)) best = found;
    }
    return best;
  }
};

// Everything the statistics pass accumulates per lane.
struct LaneState {
  vfloat m = splat(-std::numeric_limits<float>::infinity()), s{}, sa{}, saz{};
  ChunkArgmax pred, target_pred;
};

// Folds x into the lane state: with the cap as a fixed shift for a bounded
// softcapped row, else with the running max. Returns the chunk's max.
template <int NV, int TR>
FSCE_VINLINE vfloat absorb_values(const Recipe<float, TR>& rc, LaneState& st, const vfloat (&x)[NV],
                                  int count = kLanes) {
  return TR == kSoftcap && rc.bounded ? absorb_bounded<NV>(st.s, st.m, x, count) : absorb<NV>(st.m, st.s, x);
}

// keep: where to store the values for the row's second pass, or nullptr.
template <typename T, int MODE, int TR, int NV>
FSCE_VINLINE void absorb_chunk(const T* z, Probs<T> t, const Recipe<float, TR>& rc, int64_t j,
                               float pivot, LaneState& st, float* keep) {
  vfloat x[NV];
  for (int k = 0; k < NV; ++k) x[k] = load_value<T, TR>(rc, z + j + k * kLanes);
  if (keep)
    for (int k = 0; k < NV; ++k) storev(keep + j + k * kLanes, x[k]);
  const vfloat cm = absorb_values<NV, TR>(rc, st, x);
  if constexpr (MODE != kPlain) {
    for (int k = 0; k < NV; ++k) {
      const vfloat a = coef_vec<T, MODE>(t, rc.w, j + k * kLanes, kLanes, rc.eps, rc.inv_c);
      st.sa += a;
      st.saz += a * (x[k] - pivot);
    }
  }
  if (rc.stats) {
    st.pred.update(cm, j);
    if constexpr (MODE == kProb) {
      vfloat ct = t.vec(j, kLanes);
      for (int k = 1; k < NV; ++k) ct = vmax(ct, t.vec(j + k * kLanes, kLanes));
      st.target_pred.update(ct, j);
    }
  }
}

template <typename T, int MODE, int TR>
FSCE_VINLINE Stats<float> stats_vec(const T* z, Probs<T> t, const Recipe<float, TR>& rc, int64_t C,
                                    float pivot, float* keep) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  LaneState st;
  // A bounded row's shift is its cap, for good.
  if (TR == kSoftcap && rc.bounded) st.m = splat(rc.tr.cap);
  int64_t j = 0;
  constexpr int NV = kChunk<MODE>;
  for (; j + NV * kLanes <= C; j += NV * kLanes) absorb_chunk<T, MODE, TR, NV>(z, t, rc, j, pivot, st, keep);
  for (; j + kLanes <= C; j += kLanes) absorb_chunk<T, MODE, TR, 1>(z, t, rc, j, pivot, st, keep);
  if (j < C) {
    const int count = static_cast<int>(C - j);
    const vint in_row = lane_ids() < count;
    // Padding lanes become -inf after the transform (softcap maps -inf to -cap).
    const vfloat x[1] = {in_row ? load_value<T, TR>(rc, z + j, count) : splat(-kInf)};
    if (keep) store_partial(keep + j, x[0], count);
    absorb_values<1, TR>(rc, st, x, count);
    if constexpr (MODE != kPlain) {
      const vfloat a = coef_vec<T, MODE>(t, rc.w, j, count, rc.eps, rc.inv_c);
      const vfloat xa = in_row ? x[0] : splat(pivot);
      st.sa += a;
      st.saz += a * (xa - pivot);
    }
    if (rc.stats) {
      st.pred.update(x[0], j);
      if constexpr (MODE == kProb) st.target_pred.update(in_row ? t.vec(j, count) : splat(-kInf), j);
    }
  }
  const float M = hmax(st.m);
  float S = 0.f;
  for (int l = 0; l < kLanes; ++l)
    if (st.m[l] != -kInf) S += st.s[l] * std::exp(st.m[l] - M);
  const auto v_at = [&](int64_t i) FSCE_VINLINE_LAMBDA {
    return load_value<T, TR>(rc, z + i, 1)[0];
  };
  int64_t pred = rc.stats ? st.pred.first(C, NV, v_at) : -1;
  if (rc.stats && !(S == S)) {
    // A nan logit skipped the chunk test above: torch.argmax's is the first nan.
    for (int64_t i = 0; i < C; ++i) {
      const float v = v_at(i);
      if (v != v) {
        pred = i;
        break;
      }
    }
  }
  const int64_t target_pred =
      rc.stats && MODE == kProb
          ? st.target_pred.first(C, NV, [&](int64_t i) FSCE_VINLINE_LAMBDA { return static_cast<float>(t.at(i)); })
          : -1;
  return {M, std::log(S), hsum(st.sa), hsum(st.saz), pred < 0 && C > 0 ? 0 : pred, target_pred};
}

template <typename T, int TR>
FSCE_VINLINE float sum_coef_vec(Probs<T> t, const Recipe<float, TR>& rc, int64_t C) {
  vfloat sa{};
  for (int64_t j = 0; j < C; j += kLanes)
    sa += coef_vec<T, kProb>(t, rc.w, j, static_cast<int>(std::min<int64_t>(kLanes, C - j)), rc.eps,
                             rc.inv_c);
  return hsum(sa);
}

// The gradient of kLanes classes from j (`count` of them in the row).
// kept: the row's values from its first pass (see absorb_chunk), or nullptr.
// (A function, not a lambda: a lambda's body would not take the ISA clone's
// target, and vectors would cross an ABI boundary.)
template <typename T, int MODE, int TR>
FSCE_VINLINE vfloat grad_at(const T* z, Probs<T> t, const Recipe<float, TR>& rc, float lse_hi, float lse_lo,
                            GradCoefs<float> c, int64_t y, const float* kept, int64_t j, int count) {
  const bool full = count == kLanes;
  vfloat slope, v;
  if constexpr (TR == kSoftcap) {
    if (kept) {
      v = full ? loadv(kept + j) : load_partial(kept + j, count, 0.f);
      slope = softcap_slope(rc.tr, v * rc.tr.inv_cap);  // v = cap * t, kept by the first pass
    }
  }
  if (TR != kSoftcap || !kept)
    v = load_value_slope<T, TR>(rc, z + j, count, &slope);
  vfloat d = c.gA * exp2v(((v - lse_hi) - lse_lo) * kLog2e);
  if constexpr (MODE != kPlain) d -= c.gk * coef_vec<T, MODE>(t, rc.w, j, count, rc.eps, rc.inv_c);
  // The target's -coef_y is folded in fp32, before rounding to the output type.
  // A lane select, not d[y - j], so that d stays in a register.
  if (static_cast<uint64_t>(y - j) < kLanes) d = lane_ids() == int(y - j) ? d - c.gy : d;
  if constexpr (TR != kIdentity) d = d * slope;
  return d;
}

// Whole vectors go 4 at a time (all loaded before any store, which the
// in-place mode's out == z allows), then the rest one at a time.
template <typename T, int MODE, int TR>
FSCE_VINLINE void grad_vec(const T* z, Probs<T> t, T* out, const Recipe<float, TR>& rc, int64_t C,
                           float lse_hi, float lse_lo, GradCoefs<float> c, int64_t y, const float* kept) {
  constexpr int NV = 4;
  int64_t j = 0;
  for (; j + NV * kLanes <= C; j += NV * kLanes) {
    vfloat d[NV];
    for (int k = 0; k < NV; ++k)
      d[k] = grad_at<T, MODE, TR>(z, t, rc, lse_hi, lse_lo, c, y, kept, j + k * kLanes, kLanes);
    for (int k = 0; k < NV; ++k) storev(out + j + k * kLanes, d[k]);
  }
  for (; j < C; j += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, C - j));
    const vfloat d = grad_at<T, MODE, TR>(z, t, rc, lse_hi, lse_lo, c, y, kept, j, count);
    if (count == kLanes)
      storev(out + j, d);
    else
      store_partial(out + j, d, count);
  }
}

// ------------------------------------------------------------ row dispatch

// keep / kept: a row of C floats that carries the values from row_stats to
// row_grad (contiguous float rows only), or nullptr.
template <typename T, typename acc_t, int TR>
FSCE_VINLINE Stats<acc_t> row_stats(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C, int mode,
                                    acc_t pivot, float* keep) {
  if constexpr (!std::is_same_v<T, double>) {
    if (row.step == 1) {
      if (mode == kPlain) return stats_vec<T, kPlain, TR>(row.z, row.t, rc, C, pivot, keep);
      if (mode == kSmooth) return stats_vec<T, kSmooth, TR>(row.z, row.t, rc, C, pivot, keep);
      return stats_vec<T, kProb, TR>(row.z, row.t, rc, C, pivot, keep);
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

template <typename T, typename acc_t, int TR>
FSCE_VINLINE void row_grad(const Row<T>& row, const Recipe<acc_t, TR>& rc, int64_t C, int mode,
                           acc_t lse_hi, acc_t lse_lo, GradCoefs<acc_t> c, int64_t y, const float* kept) {
  if constexpr (!std::is_same_v<T, double>) {
    if (row.step == 1) {
      if (mode == kPlain) return grad_vec<T, kPlain, TR>(row.z, row.t, row.g, rc, C, lse_hi, lse_lo, c, y, kept);
      if (mode == kSmooth) return grad_vec<T, kSmooth, TR>(row.z, row.t, row.g, rc, C, lse_hi, lse_lo, c, y, kept);
      return grad_vec<T, kProb, TR>(row.z, row.t, row.g, rc, C, lse_hi, lse_lo, c, y, kept);
    }
  }
  grad_scalar<T, acc_t, TR>(row, rc, C, mode, lse_hi, lse_lo, c, y);
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
    if (write_grad) {
      const GradCoefs<acc_t> c = grad_coefs(tgt, sum_a, scale, lse_scale * static_cast<acc_t>(lse));
      row_grad<T, acc_t, TR>(row, rc, C, mode, st.m, st.log_s, c, tgt.y, kept.get());
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
  for (int64_t r = begin; r < end; ++r) {
    const Row<T> row = row_at<T>(p, r);
    const RowTarget<acc_t> tgt = row_target<acc_t>(p, r);
    if (tgt.ignored || tgt.invalid) {
      fill_row(row.g, C, row.step, tgt.ignored ? acc_t(0) : quiet_nan<acc_t>());
      continue;
    }
    const int mode = row_mode(static_cast<bool>(row.t), tgt);
    const acc_t sum_a = row_sum_a<acc_t>(p, mode, mode == kProb ? row_sum_coef<T, acc_t, TR>(row, rc, C) : acc_t(0));
    const GradCoefs<acc_t> c = grad_coefs(tgt, sum_a, grad_output[r * p.grad_output_stride],
                                          grad_lse ? grad_lse[r] : acc_t(0));
    acc_t lse_hi, lse_lo;
    split_lse(lse[r], lse_hi, lse_lo);
    row_grad<T, acc_t, TR>(row, rc, C, mode, lse_hi, lse_lo, c, tgt.y, nullptr);
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
