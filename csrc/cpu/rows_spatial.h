// The SIMD path of spatial rows (N, C, d1..dk) of float, bf16 and fp16: a
// vector holds kLanes neighbouring inner positions (rows of their own,
// contiguous in memory) and the passes loop over the classes, `inner`
// elements apart. Each lane is one row from start to end, so a row's result
// does not depend on the vector width.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

#include "rows.h"
#include "rows_simd.h"

namespace fsce::cpu {
// Included by the kernels_<isa>.cpp alone: internal linkage.
namespace {

// a_j of class j for the block's lanes (`count` of them in the launch).
template <typename T, int TR>
FSCE_VINLINE vfloat column_coef(const Row<T>& row, const Recipe<float, TR>& rc, int64_t j, int count, int mode) {
  const vfloat w = splat(rc.w ? rc.w[j] : 1.f);
  if (mode != kProb) return w;
  return w * ((1.f - rc.eps) * row.t.vec(j * row.step, count) + rc.eps * rc.inv_c);
}

// The statistics pass of a block, per lane (see Stats and stats_scalar).
struct ColumnStats {
  vfloat m = splat(-std::numeric_limits<float>::infinity()), s{}, e{}, sa{}, saz{}, pivot{};
  vint pred{}, target_pred{};

  // Written out: the implicit one would not take the ISA's target pragma.
  FSCE_VINLINE ColumnStats() {}

  // Lane l's Stats, as stats_vec would give for its row alone: a lane that
  // saw only -inf has s = 0 (exp2v's floor is not 0).
  FSCE_VINLINE Stats<float> lane(int l, bool entropy) const {
    const bool empty = m[l] == -std::numeric_limits<float>::infinity();
    const float S = empty ? 0.f : s[l], E = empty ? 0.f : e[l], log_s = std::log(S);
    return {m[l], log_s, sa[l], saz[l], pred[l], target_pred[l], entropy ? row_entropy(log_s, E, S) : 0.f};
  }
};

// Folds NV classes from j into st; argmax: the first nan or first strict
// maximum of v (and of the target), as stats_scalar finds them.
template <typename T, int TR, int NV, bool ENT>
FSCE_VINLINE void absorb_columns(const Row<T>& row, const Recipe<float, TR>& rc, int64_t j, int count, int mode,
                                 ColumnStats& st, vfloat& top, vfloat& t_top) {
  vfloat x[NV];
  for (int k = 0; k < NV; ++k) x[k] = load_value<T, TR>(rc, row.z + (j + k) * row.step, count);
  absorb<NV, ENT>(st.m, st.s, st.e, x);
  for (int k = 0; k < NV; ++k) {
    if (mode != kPlain) {
      const vfloat a = column_coef(row, rc, j + k, count, mode);
      st.sa += a;
      st.saz += a * (x[k] - st.pivot);
    }
    if (!rc.stats) continue;
    const vint jk = vint{} + static_cast<int>(j + k);
    const vint beat = (x[k] > top) | (x[k] != x[k]);
    st.pred = (beat & (top == top)) ? jk : st.pred;
    top = beat ? x[k] : top;
    if (mode == kProb) {
      const vfloat t = row.t.vec((j + k) * row.step, count);
      const vint gt = t > t_top;
      st.target_pred = gt ? jk : st.target_pred;
      t_top = gt ? t : t_top;
    }
  }
}

template <typename T, int TR, bool ENT>
FSCE_VINLINE ColumnStats column_stats(const Row<T>& row, const Recipe<float, TR>& rc, int64_t C, int count, int mode) {
  ColumnStats st;
  // As forward_rows takes it: the scalar transform of class 0.
  for (int l = 0; l < count && C > 0; ++l) st.pivot[l] = finite_or_zero(rc.tr.value(static_cast<float>(row.z[l])));
  st.pred = st.target_pred = vint{} + (C > 0 ? 0 : -1);
  vfloat top = splat(-std::numeric_limits<float>::infinity()), t_top = top;
  constexpr int NV = 4;
  int64_t j = 0;
  for (; j + NV <= C; j += NV) absorb_columns<T, TR, NV, ENT>(row, rc, j, count, mode, st, top, t_top);
  for (; j < C; ++j) absorb_columns<T, TR, 1, ENT>(row, rc, j, count, mode, st, top, t_top);
  return st;
}

// Per lane: the gradient's coefficients and lse, its target, and whether its
// row is computed or filled (`fill`: 0 when ignored, nan when invalid).
struct ColumnCoefs {
  vfloat hi{}, lo{}, gA{}, gk{}, gy{}, gH{}, H{}, fill{};
  vint y = vint{} - 1, valid{};

  FSCE_VINLINE ColumnCoefs() {}

  FSCE_VINLINE void set(int l, const GradCoefs<float>& c, float lse_hi, float lse_lo, int64_t target) {
    gA[l] = c.gA, gk[l] = c.gk, gy[l] = c.gy, gH[l] = c.gH, H[l] = c.H;
    hi[l] = lse_hi, lo[l] = lse_lo;
    y[l] = static_cast<int>(target);
    valid[l] = -1;
  }
};

// The gradient of the block, class by class, as grad_at computes a lane.
template <typename T, int TR, bool ENT>
FSCE_VINLINE void column_grad(const Row<T>& row, const Recipe<float, TR>& rc, int64_t C, int count, int mode,
                              const ColumnCoefs& c) {
  for (int64_t j = 0; j < C; ++j) {
    vfloat slope;
    const vfloat v = load_value_slope<T, TR>(rc, row.z + j * row.step, count, &slope);
    const vfloat log_p = (v - c.hi) - c.lo, p = exp2v(log_p * kLog2e);
    vfloat d = c.gA * p;
    if constexpr (ENT) d -= c.gH * (p * (exp_floor(log_p) + c.H));
    if (mode != kPlain) d -= c.gk * column_coef(row, rc, j, count, mode);
    d = c.y == static_cast<int>(j) ? d - c.gy : d;
    if constexpr (TR != kIdentity) d = d * slope;
    d = c.valid ? d : c.fill;
    if (count == kLanes)
      storev(row.g + j * row.step, d);
    else
      store_partial(row.g + j * row.step, d, count);
  }
}

// Blocks of rows [begin, end): kLanes at a time, within one n.
template <typename F>
FSCE_VINLINE void for_each_block(const CEParams& p, int64_t begin, int64_t end, F f) {
  for (int64_t r0 = begin; r0 < end;) {
    const int count = static_cast<int>(std::min<int64_t>({kLanes, p.inner - r0 % p.inner, end - r0}));
    f(r0, count);
    r0 += count;
  }
}

template <typename T, int TR>
FSCE_VINLINE void forward_columns(const CEParams& p, int64_t begin, int64_t end, bool write_grad) {
  const int64_t C = p.classes;
  const Recipe<float, TR> rc = recipe_of<float, TR>(p, nullptr);
  const ForwardOut<float> out = forward_out<float>(p, write_grad);
  for_each_block(p, begin, end, [&](int64_t r0, int count) FSCE_VINLINE_LAMBDA {
    const Row<T> row = row_at<T>(p, r0);
    const int mode = row_mode(static_cast<bool>(row.t), row_target<float>(p, r0));
    const ColumnStats st = rc.stats ? column_stats<T, TR, true>(row, rc, C, count, mode)
                                    : column_stats<T, TR, false>(row, rc, C, count, mode);
    ColumnCoefs c;
    for (int l = 0; l < count; ++l) {
      const RowTarget<float> tgt = row_target<float>(p, r0 + l);
      if (tgt.ignored || tgt.invalid) {
        c.fill[l] = skip_row(out, p, r0 + l, tgt);
        continue;
      }
      const Stats<float> s = st.lane(l, rc.stats);
      const float v_y = tgt.y >= 0 ? rc.tr.value(static_cast<float>(row.z[tgt.y * row.step + l])) : 0.f;
      c.set(l, finish_row(out, p, r0 + l, tgt, mode, s, st.pivot[l], v_y), s.m, s.log_s, tgt.y);
    }
    if (write_grad) column_grad<T, TR, false>(row, rc, C, count, mode, c);
  });
}

template <typename T, int TR>
FSCE_VINLINE void backward_columns(const CEParams& p, int64_t begin, int64_t end) {
  const int64_t C = p.classes;
  const Recipe<float, TR> rc = recipe_of<float, TR>(p, nullptr);
  for_each_block(p, begin, end, [&](int64_t r0, int count) FSCE_VINLINE_LAMBDA {
    const Row<T> row = row_at<T>(p, r0);
    const int mode = row_mode(static_cast<bool>(row.t), row_target<float>(p, r0));
    vfloat sum_a{};
    for (int64_t j = 0; mode == kProb && j < C; ++j) sum_a += column_coef(row, rc, j, count, mode);
    ColumnCoefs c;
    for (int l = 0; l < count; ++l) {
      const RowTarget<float> tgt = row_target<float>(p, r0 + l);
      if (tgt.ignored || tgt.invalid) {
        c.fill[l] = tgt.ignored ? 0.f : std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      float hi, lo;
      split_lse(static_cast<const double*>(p.lse)[r0 + l], hi, lo);
      c.set(l, backward_coefs<float>(p, r0 + l, tgt, mode, sum_a[l]), hi, lo, tgt.y);
    }
    if (p.grad_entropy)
      column_grad<T, TR, true>(row, rc, C, count, mode, c);
    else
      column_grad<T, TR, false>(row, rc, C, count, mode, c);
  });
}

}  // namespace
}  // namespace fsce::cpu
