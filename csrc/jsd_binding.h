// The binding of the generalized-JSD ops shared by every backend: checks,
// layouts and outputs, then a JsdParams for the backend's kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <optional>
#include <tuple>

#include "jsd_params.h"

namespace fsce {

struct JsdKernels {
  void (*forward)(const JsdParams&);
  void (*backward)(const JsdParams&);
};

// (loss per row, row_stats (rows, kJsdStats)), both in the accumulation type.
std::tuple<at::Tensor, at::Tensor> run_jsd_forward(const JsdKernels& k, const at::Tensor& student,
                                                   const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& labels, double beta,
                                                   double temperature, int64_t ignore_index);

// Writes grad_output[r] * dloss_r/dstudent into `grad` (a fresh tensor, or
// the student logits themselves).
void run_jsd_backward(const JsdKernels& k, const at::Tensor& grad, const at::Tensor& grad_output,
                      const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& labels, const at::Tensor& row_stats, double beta,
                      double temperature, int64_t ignore_index);

// The op entry points of one backend, under a guard built from the
// student's device (CUDA's device guard, or nothing).
template <const JsdKernels* K, typename Guard>
struct JsdOps {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels, double beta,
                                                    double temperature, int64_t ignore_index) {
    Guard guard(student.device());
    return run_jsd_forward(*K, student, teacher, labels, beta, temperature, ignore_index);
  }

  static at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& student,
                             const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                             const at::Tensor& row_stats, double beta, double temperature,
                             int64_t ignore_index) {
    Guard guard(student.device());
    at::Tensor grad = at::empty_like(student, at::MemoryFormat::Contiguous);
    run_jsd_backward(*K, grad, grad_output, student, teacher, labels, row_stats, beta, temperature,
                     ignore_index);
    return grad;
  }

  static void backward_inplace(const at::Tensor& student, const at::Tensor& grad_output,
                               const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                               const at::Tensor& row_stats, double beta, double temperature,
                               int64_t ignore_index) {
    Guard guard(student.device());
    run_jsd_backward(*K, student, grad_output, student, teacher, labels, row_stats, beta, temperature,
                     ignore_index);
  }
};

#define FSCE_REGISTER_JSD_BACKEND(m, Ops)               \
  do {                                                  \
    (m).impl("jsd_forward", &Ops::forward);             \
    (m).impl("jsd_backward", &Ops::backward);           \
    (m).impl("jsd_backward_", &Ops::backward_inplace);  \
  } while (0)

}  // namespace fsce
