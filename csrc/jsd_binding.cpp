// The generalized-JSD ops: schemas (their own library fragment, apart from
// the cross-entropy ops), the checks shared by every backend and the CPU
// registration. Python (fused_softmax_ce/jsd.py) flattens (B, T, V) to rows
// and checks what the user passed; this layer checks what the kernels rely on.
#include "jsd_binding.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

#include "binding.h"  // dtype_of, acc_type
#include "cpu/jsd_kernels.h"
#include "jsd_math.h"

namespace fsce {
namespace {

// Rows of contiguous classes, as the kernels walk them.
at::Tensor rows_layout(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

struct Prepared {
  JsdParams p{};
  at::Tensor student, teacher, labels;  // kept alive through the launch
};

Prepared prepare(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                 double beta, double temperature, int64_t ignore_index) {
  TORCH_CHECK(student.dim() == 2, "generalized_jsd: student logits must be 2-D (rows, V), got shape ",
              student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "generalized_jsd: teacher logits must have the student's shape ",
              student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "generalized_jsd: teacher logits must have the "
              "student's dtype ", student.scalar_type(), ", got ", teacher.scalar_type());
  TORCH_CHECK(teacher.device() == student.device(), "generalized_jsd: teacher logits are on ", teacher.device(),
              " but student logits are on ", student.device());
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "generalized_jsd: beta must be in [0, 1], got ", beta);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "generalized_jsd: temperature must be finite and > 0, got ", temperature);
  Prepared pr;
  JsdParams& p = pr.p;
  p.dtype = dtype_of(student);
  p.rows = student.size(0);
  p.classes = student.size(1);
  pr.student = rows_layout(student);
  pr.teacher = rows_layout(teacher);
  p.student = pr.student.data_ptr();
  p.student_stride = pr.student.stride(0);
  p.teacher = pr.teacher.data_ptr();
  p.teacher_stride = pr.teacher.stride(0);
  if (labels.has_value()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong, "generalized_jsd: labels must be int64, got ",
                labels->scalar_type());
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == p.rows,
                "generalized_jsd: labels must be 1-D with one entry per row (", p.rows, "), got shape ",
                labels->sizes());
    TORCH_CHECK(labels->device() == student.device(), "generalized_jsd: labels are on ", labels->device(),
                " but logits are on ", student.device());
    pr.labels = labels->contiguous();
    p.labels = pr.labels.data_ptr<int64_t>();
  }
  p.ignore_index = ignore_index;
  p.beta = beta;
  p.temperature = temperature;
  return pr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> run_jsd_forward(const JsdKernels& k, const at::Tensor& student,
                                                   const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& labels, double beta,
                                                   double temperature, int64_t ignore_index) {
  Prepared pr = prepare(student, teacher, labels, beta, temperature, ignore_index);
  const auto opts = student.options().dtype(acc_type(student));
  at::Tensor loss = at::empty({pr.p.rows}, opts);
  at::Tensor stats = at::empty({pr.p.rows, kJsdStats}, opts);
  pr.p.loss = loss.data_ptr();
  pr.p.row_stats = stats.data_ptr();
  if (pr.p.rows > 0) k.forward(pr.p);
  return {loss, stats};
}

void run_jsd_backward(const JsdKernels& k, const at::Tensor& grad, const at::Tensor& grad_output,
                      const at::Tensor& student, const at::Tensor& teacher,
                      const std::optional<at::Tensor>& labels, const at::Tensor& row_stats, double beta,
                      double temperature, int64_t ignore_index) {
  Prepared pr = prepare(student, teacher, labels, beta, temperature, ignore_index);
  TORCH_CHECK(grad.sizes() == student.sizes() && grad.scalar_type() == student.scalar_type() &&
                  (grad.size(1) <= 1 || grad.stride(1) == 1),
              "generalized_jsd: the gradient must have the student's shape and dtype with contiguous rows");
  // In place, the kernels read each element before they write it: only
  // the student itself (not a copy made by rows_layout) may be the output.
  TORCH_CHECK(grad.data_ptr() != student.data_ptr() || pr.student.data_ptr() == student.data_ptr(),
              "generalized_jsd: an in-place gradient needs student rows with contiguous classes");
  const at::ScalarType acc = acc_type(student);
  TORCH_CHECK(row_stats.scalar_type() == acc && row_stats.dim() == 2 && row_stats.size(0) == pr.p.rows &&
                  row_stats.size(1) == kJsdStats && row_stats.device() == student.device(),
              "generalized_jsd: row_stats must be the forward's (", pr.p.rows, ", ", kJsdStats, ") ", acc,
              " tensor, got ", row_stats.scalar_type(), " of shape ", row_stats.sizes());
  TORCH_CHECK(grad_output.scalar_type() == acc && grad_output.device() == student.device() &&
                  grad_output.dim() <= 1 && (grad_output.numel() == 1 || grad_output.numel() == pr.p.rows),
              "generalized_jsd: grad_output must be one ", acc, " value or one per row (", pr.p.rows, "), got ",
              grad_output.scalar_type(), " of shape ", grad_output.sizes());
  const at::Tensor stats = row_stats.contiguous();
  const at::Tensor go = grad_output.reshape({grad_output.numel()});
  pr.p.row_stats = const_cast<void*>(stats.data_ptr());
  pr.p.grad_output = go.data_ptr();
  pr.p.grad_output_stride = go.numel() == 1 ? 0 : go.stride(0);
  pr.p.grad = grad.data_ptr();
  pr.p.grad_stride = grad.stride(0);
  if (pr.p.rows > 0 && pr.p.classes > 0) k.backward(pr.p);
}

namespace {
struct NoGuard {
  explicit NoGuard(c10::Device) {}
};
constexpr JsdKernels kJsdCpu{cpu::jsd_forward, cpu::jsd_backward};
using JsdCpuOps = JsdOps<&kJsdCpu, NoGuard>;
}  // namespace

}  // namespace fsce

TORCH_LIBRARY_FRAGMENT(fused_softmax_ce, m) {
  // student and teacher logits (rows, V) of one dtype, labels (rows,) int64
  // or None. Returns the loss per row (0 on ignored rows) and the row
  // statistics the backward reads (jsd_math.h), in float32 (float64 for
  // float64 logits).
  m.def("jsd_forward(Tensor student, Tensor teacher, Tensor? labels, float beta, float temperature, "
        "int ignore_index) -> (Tensor, Tensor)");
  // grad_output (one value, or one per row) times dloss/dstudent.
  m.def("jsd_backward(Tensor grad_output, Tensor student, Tensor teacher, Tensor? labels, Tensor row_stats, "
        "float beta, float temperature, int ignore_index) -> Tensor");
  // The same gradient written over the student logits (the chunked linear form).
  m.def("jsd_backward_(Tensor(a!) student, Tensor grad_output, Tensor teacher, Tensor? labels, "
        "Tensor row_stats, float beta, float temperature, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(fused_softmax_ce, CPU, m) { FSCE_REGISTER_JSD_BACKEND(m, fsce::JsdCpuOps); }
