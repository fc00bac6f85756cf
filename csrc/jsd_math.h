// Per-row algebra of the generalized JSD, shared by the CPU and CUDA kernels.
//
// With v = z / T, s = log_softmax(v_student), t = log_softmax(v_teacher),
// p = e^s, q = e^t (TRL's generalized_jsd_loss):
//   beta = 0:  loss = sum q (t - s)                 dloss/dv_j = p_j - q_j
//   beta = 1:  loss = sum p (s - t) = X             dloss/dv_j = p_j (s_j - t_j - X)
//   else:      m = log((1 - beta) p + beta q),
//              loss = beta sum q (t - m) + (1 - beta) X,  X = sum p (s - m),
//                                                   dloss/dv_j = (1 - beta) p_j (s_j - m_j - X)
// and dloss/dz = dloss/dv / T. A term whose probability is 0 adds 0 (0 * inf
// would be nan where a logit is -inf). The forward keeps per row the shifts
// and log-sums of both softmaxes and X: the backward reads each row once.
#pragma once
#include <cmath>

#include "jsd_params.h"

#if defined(__CUDACC__)
#define FSCE_JSD_HD __host__ __device__ __forceinline__
#else
#define FSCE_JSD_HD inline
#endif

namespace fsce {

enum JsdForm : int { kForwardKL = 0, kReverseKL = 1, kMixture = 2 };

inline int jsd_form(double beta) { return beta == 0.0 ? kForwardKL : (beta == 1.0 ? kReverseKL : kMixture); }

// row_stats layout: s_j = (v_j - s_max) - s_log_sum, the same for t; x = X.
constexpr int kJsdStats = 5;
template <typename acc_t>
struct RowStats {
  acc_t s_max, s_log_sum, t_max, t_log_sum, x;
};

template <typename acc_t>
struct JsdCoefs {
  acc_t beta, log_beta, log_1m_beta, inv_t;
};

template <typename acc_t>
JsdCoefs<acc_t> jsd_coefs(const JsdParams& p) {
  // log(0) = -inf is never used: the mixture form has 0 < beta < 1.
  return {static_cast<acc_t>(p.beta), static_cast<acc_t>(std::log(p.beta)),
          static_cast<acc_t>(std::log1p(-p.beta)), static_cast<acc_t>(1.0 / p.temperature)};
}

FSCE_JSD_HD float jsd_exp(float x) { return expf(x); }
FSCE_JSD_HD double jsd_exp(double x) { return exp(x); }
FSCE_JSD_HD float jsd_log(float x) { return logf(x); }
FSCE_JSD_HD double jsd_log(double x) { return log(x); }
FSCE_JSD_HD float jsd_log1p(float x) { return log1pf(x); }
FSCE_JSD_HD double jsd_log1p(double x) { return log1p(x); }

// log((1 - beta) e^s + beta e^t), stably (neither is +inf: both are <= 0).
template <typename acc_t>
FSCE_JSD_HD acc_t mixture_log(acc_t s, acc_t t, const JsdCoefs<acc_t>& c) {
  const acc_t a = s + c.log_1m_beta, b = t + c.log_beta;
  const acc_t hi = a > b ? a : b, lo = a > b ? b : a;
  if (lo == -INFINITY) return hi;
  return hi + jsd_log1p(jsd_exp(lo - hi));
}

// One class's contribution: the loss term and the X term.
template <int FORM, typename acc_t>
FSCE_JSD_HD void jsd_terms(acc_t s, acc_t t, const JsdCoefs<acc_t>& c, acc_t& loss, acc_t& x) {
  const acc_t p = jsd_exp(s), q = jsd_exp(t);
  if constexpr (FORM == kForwardKL) {
    loss = q == acc_t(0) ? acc_t(0) : q * (t - s);
    x = 0;
  } else if constexpr (FORM == kReverseKL) {
    loss = x = p == acc_t(0) ? acc_t(0) : p * (s - t);
  } else {
    const acc_t m = mixture_log(s, t, c);
    const acc_t kt = q == acc_t(0) ? acc_t(0) : q * (t - m);
    x = p == acc_t(0) ? acc_t(0) : p * (s - m);
    loss = c.beta * kt + (1 - c.beta) * x;
  }
}

// The row's loss from its sums (X is the sum of x terms).
template <int FORM, typename acc_t>
FSCE_JSD_HD acc_t jsd_row_loss(acc_t loss_sum, acc_t x_sum) {
  return FORM == kReverseKL ? x_sum : loss_sum;
}

// dloss/dv_j; the caller scales by g / T.
template <int FORM, typename acc_t>
FSCE_JSD_HD acc_t jsd_grad(acc_t s, acc_t t, acc_t x, const JsdCoefs<acc_t>& c) {
  const acc_t p = jsd_exp(s);
  if constexpr (FORM == kForwardKL) {
    return p - jsd_exp(t);
  } else if constexpr (FORM == kReverseKL) {
    // Guarded on s, as the CPU's vector code: where p underflows instead,
    // p * (finite) is 0 all the same.
    return s == -INFINITY ? acc_t(0) : p * (s - t - x);
  } else {
    return p == acc_t(0) ? acc_t(0) : (1 - c.beta) * p * (s - mixture_log(s, t, c) - x);
  }
}

}  // namespace fsce
