// The SIMD path of contiguous float, bf16 and fp16 rows, kLanes wide: the logit
// transform on vectors (and the softcap's tanh table), the statistics pass
// (one online pass, chunked) and the gradient pass.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

#include "isa.h"  // kTanhTableSize
#include "rows.h"
#include "simd.h"

namespace fsce::cpu {
// Included by kernels.cpp alone (one translation unit): internal linkage.
namespace {

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

// d raised to where exp2v clamps its argument (its result is 2^-126 there,
// not 0): an entropy term exp(d) * d below it is about 1e-36, and a -inf one
// is not 0 * -inf (see entropy_term).
FSCE_VINLINE vfloat exp_floor(vfloat d) {
  return vmax(d, splat(-126.f / kLog2e));
}

// Folds NV vectors into the per-lane running max and rescaled sum (and, with
// ENT, the entropy sum e, see entropy_term): one rescale per NV vectors, one
// exp2 per element. Returns the chunk's max.
template <int NV, bool ENT>
FSCE_VINLINE vfloat absorb(vfloat& m, vfloat& s, vfloat& e, const vfloat (&x)[NV]) {
  const vfloat cm = chunk_max(x);
  const vfloat nm = vmax(m, cm);
  // A lane that has seen only -inf keeps shift 0, so that exp2 sees -inf, not nan.
  const vfloat shift = nm == -std::numeric_limits<float>::infinity() ? vfloat{} : nm;
  const vfloat alpha = exp2v((m - shift) * kLog2e);
  vfloat acc = s * alpha, eacc;
  // rebase_entropy: a lane with s = 0 has m - shift = -inf, made finite here.
  if constexpr (ENT) eacc = alpha * (e + s * exp_floor(m - shift));
  for (int k = 0; k < NV; ++k) {
    const vfloat ex = exp2v((x[k] - shift) * kLog2e);
    acc += ex;
    if constexpr (ENT) eacc += ex * exp_floor(x[k] - shift);
  }
  s = acc;
  if constexpr (ENT) e = eacc;
  m = nm;
  return cm;
}

// The same for values bounded by `shift` (a softcapped row's cap): no
// running max and no rescale; lanes at or past `count` add nothing.
template <int NV, bool ENT>
FSCE_VINLINE vfloat absorb_bounded(vfloat& s, vfloat& e, vfloat shift, const vfloat (&x)[NV], int count = kLanes) {
  vfloat acc{}, eacc{};
  for (int k = 0; k < NV; ++k) {
    const vfloat ex = exp2v((x[k] - shift) * kLog2e);
    acc += ex;
    if constexpr (ENT) eacc += ex * exp_floor(x[k] - shift);
  }
  s += count == kLanes ? acc : (lane_ids() < count ? acc : vfloat{});
  if constexpr (ENT) e += count == kLanes ? eacc : (lane_ids() < count ? eacc : vfloat{});
  return chunk_max(x);
}

// Per-lane first argmax at chunk granularity, for the statistics: a lane
// remembers the first chunk (of `vectors` vectors) whose maximum beat its own;
// first() then finds the element inside that chunk. A compare and two blends
// per chunk, not per element. (A nan row is resolved by stats_vec.)
struct ChunkArgmax {
  vfloat m = splat(-std::numeric_limits<float>::infinity());
  vint base = vint{} - 1;

  // Written out: the implicit one would not take the ISA's target pragma.
  FSCE_VINLINE ChunkArgmax() {}

  FSCE_VINLINE void update(vfloat cm, int64_t j) {
    const vint gt = cm > m;
    m = gt ? cm : m;
    base = gt ? vint{} + static_cast<int>(j) : base;
  }

  // The lowest class index holding the row's maximum; value_at(i) recomputes
  // element i as the pass saw it (an always_inline callable, so that it is
  // inlined, FMA contraction included, as the pass was).
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
  vfloat m = splat(-std::numeric_limits<float>::infinity()), s{}, sa{}, saz{}, e{};
  ChunkArgmax pred, target_pred;

  // Written out: the implicit one would not take the ISA's target pragma.
  FSCE_VINLINE LaneState() {}
};

// Folds x into the lane state: with the cap as a fixed shift for a bounded
// softcapped row, else with the running max. Returns the chunk's max.
template <int NV, int TR, bool ENT>
FSCE_VINLINE vfloat absorb_values(const Recipe<float, TR>& rc, LaneState& st, const vfloat (&x)[NV],
                                  int count = kLanes) {
  return TR == kSoftcap && rc.bounded ? absorb_bounded<NV, ENT>(st.s, st.e, st.m, x, count)
                                      : absorb<NV, ENT>(st.m, st.s, st.e, x);
}

// keep: where to store the values for the row's second pass, or nullptr.
// ENT: the statistics' entropy too (rc.stats, fixed per launch).
template <typename T, int MODE, int TR, int NV, bool ENT>
FSCE_VINLINE void absorb_chunk(const T* z, Probs<T> t, const Recipe<float, TR>& rc, int64_t j,
                               float pivot, LaneState& st, float* keep) {
  vfloat x[NV];
  for (int k = 0; k < NV; ++k) x[k] = load_value<T, TR>(rc, z + j + k * kLanes);
  if (keep)
    for (int k = 0; k < NV; ++k) storev(keep + j + k * kLanes, x[k]);
  const vfloat cm = absorb_values<NV, TR, ENT>(rc, st, x);
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

template <typename T, int MODE, int TR, bool ENT>
FSCE_VINLINE Stats<float> stats_vec(const T* z, Probs<T> t, const Recipe<float, TR>& rc, int64_t C,
                                    float pivot, float* keep) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  LaneState st;
  // A bounded row's shift is its cap, for good.
  if (TR == kSoftcap && rc.bounded) st.m = splat(rc.tr.cap);
  int64_t j = 0;
  constexpr int NV = kChunk<MODE>;
  for (; j + NV * kLanes <= C; j += NV * kLanes) absorb_chunk<T, MODE, TR, NV, ENT>(z, t, rc, j, pivot, st, keep);
  for (; j + kLanes <= C; j += kLanes) absorb_chunk<T, MODE, TR, 1, ENT>(z, t, rc, j, pivot, st, keep);
  if (j < C) {
    const int count = static_cast<int>(C - j);
    const vint in_row = lane_ids() < count;
    // Padding lanes become -inf after the transform (softcap maps -inf to -cap).
    const vfloat x[1] = {in_row ? load_value<T, TR>(rc, z + j, count) : splat(-kInf)};
    if (keep) store_partial(keep + j, x[0], count);
    absorb_values<1, TR, ENT>(rc, st, x, count);
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
  float S = 0.f, E = 0.f;
  for (int l = 0; l < kLanes; ++l) {
    if (st.m[l] == -kInf) continue;
    const float alpha = std::exp(st.m[l] - M);
    S += st.s[l] * alpha;
    if (ENT) E += rebase_entropy(st.e[l], st.s[l], alpha, st.m[l], M);
  }
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
  return {M, std::log(S), hsum(st.sa), hsum(st.saz), pred < 0 && C > 0 ? 0 : pred, target_pred,
          ENT ? row_entropy(std::log(S), E, S) : 0.f};
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
template <typename T, int MODE, int TR, bool ENT>
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
  const vfloat log_p = (v - lse_hi) - lse_lo, p = exp2v(log_p * kLog2e);
  vfloat d = c.gA * p;
  // entropy_grad, with log p at exp2v's floor (where p is 2^-126, not 0).
  if constexpr (ENT) d -= c.gH * (p * (exp_floor(log_p) + c.H));
  if constexpr (MODE != kPlain) d -= c.gk * coef_vec<T, MODE>(t, rc.w, j, count, rc.eps, rc.inv_c);
  // The target's -coef_y is folded in fp32, before rounding to the output type.
  // A lane select, not d[y - j], so that d stays in a register.
  if (static_cast<uint64_t>(y - j) < kLanes) d = lane_ids() == int(y - j) ? d - c.gy : d;
  if constexpr (TR != kIdentity) d = d * slope;
  return d;
}

// Whole vectors go 4 at a time (all loaded before any store, which the
// in-place mode's out == z allows), then the rest one at a time.
template <typename T, int MODE, int TR, bool ENT>
FSCE_VINLINE void grad_vec(const T* z, Probs<T> t, T* out, const Recipe<float, TR>& rc, int64_t C,
                           float lse_hi, float lse_lo, GradCoefs<float> c, int64_t y, const float* kept) {
  constexpr int NV = 4;
  int64_t j = 0;
  for (; j + NV * kLanes <= C; j += NV * kLanes) {
    vfloat d[NV];
    for (int k = 0; k < NV; ++k)
      d[k] = grad_at<T, MODE, TR, ENT>(z, t, rc, lse_hi, lse_lo, c, y, kept, j + k * kLanes, kLanes);
    for (int k = 0; k < NV; ++k) storev(out + j + k * kLanes, d[k]);
  }
  for (; j < C; j += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, C - j));
    const vfloat d = grad_at<T, MODE, TR, ENT>(z, t, rc, lse_hi, lse_lo, c, y, kept, j, count);
    if (count == kLanes)
      storev(out + j, d);
    else
      store_partial(out + j, d, count);
  }
}

}  // namespace
}  // namespace fsce::cpu
