#include "binding.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace fsce {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, "fused_softmax_ce: logits must be float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// True when each n's [C, S] block is contiguous, the layout kernels walk.
bool blocks_contiguous(const at::Tensor& t) {
  if (t.dim() == 2) return t.size(1) <= 1 || t.stride(1) == 1;
  return (t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2));
}

at::Tensor in_block_layout(const at::Tensor& t) {
  return blocks_contiguous(t) ? t : t.contiguous();
}

struct Prepared {
  CEParams p{};
  // Tensors the params point into, kept alive through the launch.
  at::Tensor logits, target, weight, weight_sum;
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t ignore_index,
                 double label_smoothing) {
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3,
              "fused_softmax_ce: logits must be 2-D (N, C) or 3-D (N, C, S), got shape ",
              logits.sizes());
  Prepared pr;
  CEParams& p = pr.p;
  p.dtype = dtype_of(logits);
  p.outer = logits.size(0);
  p.classes = logits.size(1);
  p.inner = logits.dim() == 3 ? logits.size(2) : 1;
  p.rows = p.outer * p.inner;
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  TORCH_CHECK(target.device() == logits.device(), "fused_softmax_ce: target is on ",
              target.device(), " but logits are on ", logits.device());

  pr.logits = in_block_layout(logits);
  p.logits = pr.logits.data_ptr();
  p.logits_outer_stride = pr.logits.stride(0);

  if (target.scalar_type() == at::kLong) {
    TORCH_CHECK(target.dim() == 1 && target.numel() == p.rows,
                "fused_softmax_ce: class-index target must be 1-D with one entry per row (",
                p.rows, "), got shape ", target.sizes());
    pr.target = target.contiguous();
    p.target_index = pr.target.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(at::isFloatingType(target.scalar_type()),
                "fused_softmax_ce: target must be int64 class indices or floating-point class "
                "probabilities, got ",
                target.scalar_type());
    TORCH_CHECK(target.sizes() == logits.sizes(),
                "fused_softmax_ce: probability target must have the logits' shape ",
                logits.sizes(), ", got ", target.sizes());
    // The logits' dtype or the accumulation type, read as is; any other is
    // converted to the accumulation type, so no precision is lost.
    p.target_prob_acc = target.scalar_type() != logits.scalar_type();
    pr.target = in_block_layout(p.target_prob_acc ? target.to(acc_type(logits)) : target);
    p.target_prob = pr.target.data_ptr();
    p.target_outer_stride = pr.target.stride(0);
  }

  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.numel() == p.classes,
                "weight tensor should be defined either for all ", p.classes,
                " classes or no classes but got weight tensor of shape: ", w.sizes());
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), "fused_softmax_ce: weight must be floating point, got ",
                w.scalar_type());
    TORCH_CHECK(w.device() == logits.device(), "fused_softmax_ce: weight is on ", w.device(),
                " but logits are on ", logits.device());
    // Kernels read weights in the accumulation type: C values, converted once,
    // which also serves fp32 weights with half logits (autocast).
    pr.weight = w.to(acc_type(logits)).contiguous();
    p.weight = pr.weight.data_ptr();
    if (label_smoothing > 0.0 && p.target_index != nullptr) {
      // Computed on the device: no host sync.
      pr.weight_sum = pr.weight.sum();
      p.weight_sum = pr.weight_sum.data_ptr();
    }
  }
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  return pr;
}

void check_rows_tensor(const at::Tensor& t, int64_t rows, at::ScalarType dtype,
                       const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "fused_softmax_ce: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), "fused_softmax_ce: ", name, " is on ", t.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, "fused_softmax_ce: ", name,
              " must be 1-D with one entry per row (", rows, "), got shape ", t.sizes());
}

// The forward's common tail: target check, per-row outputs (loss in the
// accumulation type, lse in float64), scratch, launch.
std::tuple<at::Tensor, at::Tensor> launch_forward(const Kernels& k, Prepared& pr, bool write_grad) {
  if (k.check_targets && pr.p.target_index) k.check_targets(pr.p);
  const auto opts = pr.logits.options().dtype(acc_type(pr.logits));
  at::Tensor loss = at::empty({pr.p.rows}, opts);
  at::Tensor lse = at::empty({pr.p.rows}, opts.dtype(at::kDouble));
  pr.p.loss = loss.data_ptr();
  pr.p.lse = lse.data_ptr();
  const int64_t bytes = k.forward_workspace ? k.forward_workspace(pr.p) : 0;
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({bytes}, pr.logits.options().dtype(at::kByte));
    pr.p.workspace = workspace.data_ptr();
  }
  if (pr.p.rows > 0) k.forward(pr.p, write_grad);
  return {loss, lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> run_forward(const Kernels& k, const at::Tensor& logits,
                                               const at::Tensor& target,
                                               const std::optional<at::Tensor>& weight,
                                               int64_t ignore_index, double label_smoothing) {
  Prepared pr = prepare(logits, target, weight, ignore_index, label_smoothing);
  return launch_forward(k, pr, /*write_grad=*/false);
}

at::Tensor run_backward(const Kernels& k, const at::Tensor& grad_loss,
                        const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits,
                        const at::Tensor& target, const std::optional<at::Tensor>& weight,
                        const at::Tensor& lse, int64_t ignore_index, double label_smoothing) {
  Prepared pr = prepare(logits, target, weight, ignore_index, label_smoothing);
  check_rows_tensor(grad_loss, pr.p.rows, acc_type(logits), logits, "grad_loss");
  check_rows_tensor(lse, pr.p.rows, at::kDouble, logits, "lse");
  if (k.check_targets && pr.p.target_index) k.check_targets(pr.p);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor grad_lse_c;
  if (grad_lse.has_value()) {
    check_rows_tensor(*grad_lse, pr.p.rows, grad_lse->scalar_type(), logits, "grad_lse");
    grad_lse_c = grad_lse->to(acc_type(logits)).contiguous();
    pr.p.grad_lse = grad_lse_c.data_ptr();
  }
  at::Tensor grad = at::empty(pr.logits.sizes(), pr.logits.options().memory_format(
                                                     at::MemoryFormat::Contiguous));
  pr.p.lse = const_cast<void*>(lse_c.data_ptr());
  pr.p.grad_rows = grad_loss.data_ptr();
  pr.p.grad_rows_stride = grad_loss.stride(0);
  pr.p.grad = grad.data_ptr();
  pr.p.grad_outer_stride = grad.dim() > 0 ? grad.stride(0) : 0;
  if (pr.p.rows > 0 && pr.p.classes > 0) k.backward(pr.p);
  return grad;
}

at::Tensor run_forward_inplace(const Kernels& k, const at::Tensor& logits,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               const at::Tensor& grad_scale, int64_t ignore_index,
                               double label_smoothing) {
  TORCH_CHECK((logits.dim() == 2 || logits.dim() == 3) && blocks_contiguous(logits),
              "fused_softmax_ce: inplace_backward writes the gradient into the logits, so their "
              "class (and spatial) dimensions must be contiguous; got shape ",
              logits.sizes(), " with strides ", logits.strides());
  at::assert_no_internal_overlap(logits);
  Prepared pr = prepare(logits, target, weight, ignore_index, label_smoothing);
  TORCH_CHECK(grad_scale.numel() == 1 && grad_scale.scalar_type() == acc_type(logits) &&
                  grad_scale.device() == logits.device(),
              "fused_softmax_ce: grad_scale must be one ", acc_type(logits), " element on ",
              logits.device(), ", got ", grad_scale.scalar_type(), " of shape ",
              grad_scale.sizes(), " on ", grad_scale.device());
  const at::Tensor scale = grad_scale.contiguous();
  pr.p.grad = logits.data_ptr();
  pr.p.grad_outer_stride = logits.stride(0);
  pr.p.grad_scale = scale.data_ptr();
  return std::get<0>(launch_forward(k, pr, /*write_grad=*/true));
}

void run_scale_grad(const Kernels& k, const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK((grad.dim() == 2 || grad.dim() == 3) && blocks_contiguous(grad),
              "fused_softmax_ce: grad must be 2-D or 3-D with contiguous class dimension, got "
              "shape ",
              grad.sizes(), " with strides ", grad.strides());
  at::assert_no_internal_overlap(grad);
  CEParams p{};
  p.dtype = dtype_of(grad);
  p.outer = grad.size(0);
  p.classes = grad.size(1);
  p.inner = grad.dim() == 3 ? grad.size(2) : 1;
  p.rows = p.outer * p.inner;
  p.grad = grad.data_ptr();
  p.grad_outer_stride = grad.stride(0);
  TORCH_CHECK(grad_output.scalar_type() == acc_type(grad) && grad_output.device() == grad.device(),
              "fused_softmax_ce: grad_output must be ", acc_type(grad), " on ", grad.device(),
              ", got ", grad_output.scalar_type(), " on ", grad_output.device());
  at::Tensor g;
  if (grad_output.numel() == 1) {
    g = grad_output.reshape({1});
    p.grad_rows_stride = 0;
  } else {
    TORCH_CHECK(grad_output.numel() == p.rows,
                "fused_softmax_ce: grad_output must hold one element or one per row (", p.rows,
                "), got shape ", grad_output.sizes());
    g = grad_output.reshape({p.rows});
    p.grad_rows_stride = g.stride(0);
  }
  p.grad_rows = g.data_ptr();
  if (p.rows > 0 && p.classes > 0) k.scale_rows(p);
}

}  // namespace fsce
