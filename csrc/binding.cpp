#include "binding.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace fsce {

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

namespace {

// True when each n's [C, S] block is contiguous, the layout kernels walk.
bool blocks_contiguous(const at::Tensor& t) {
  if (t.dim() == 2) return t.size(1) <= 1 || t.stride(1) == 1;
  return (t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) == t.size(2));
}

at::Tensor in_block_layout(const at::Tensor& t) {
  return blocks_contiguous(t) ? t : t.contiguous();
}

// The gradient of `logits` (in block layout): for row-padded logits (an
// outer stride above C * S, e.g. a slice x[:, 3:3 + C] of wider rows) its
// outer stride and storage offset equal theirs modulo 16 bytes (under 16
// bytes of padding a row), so that input and gradient rows share their
// 16-byte alignment (the
// storages themselves are aligned) and the CUDA row kernels keep their
// vector path; the padding is never written. Other logits (overlapping rows
// included) get a contiguous gradient at that offset. _ops.py's fake kernel
// computes the same layout.
at::Tensor gradient_like(const at::Tensor& logits) {
  const int64_t n = logits.size(0), inner = logits.dim() == 3 ? logits.size(2) : 1;
  const int64_t block = logits.size(1) * inner;
  // The padding keeps the row stride's phase modulo 16 bytes, not its length:
  // a narrow slice of wide rows must not cost a wide gradient.
  const int64_t phase = 16 / logits.element_size();
  const int64_t outer = n > 1 && block > 0 && logits.stride(0) > block
                            ? block + (logits.stride(0) - block) % phase
                            : block;
  const int64_t offset = logits.storage_offset() % phase;
  // Whole padded rows, so that n * outer elements from the gradient's start are its own.
  const at::Tensor buffer = at::empty({offset + n * outer}, logits.options());
  if (logits.dim() == 3) return buffer.as_strided(logits.sizes(), {outer, inner, 1}, offset);
  return buffer.as_strided(logits.sizes(), {outer, 1}, offset);
}

// Rows that share memory without sharing elements (a stride between rows
// under a row's length, as x.unfold(0, 8, 4) makes): ATen's overlap check
// answers "too hard" for them, and writing one row would change another's
// logits (on a GPU, also a race). `t` is in block layout.
void check_rows_disjoint(const at::Tensor& t, const char* what) {
  const int64_t block = t.size(1) * (t.dim() == 3 ? t.size(2) : 1);
  TORCH_CHECK(t.size(0) <= 1 || block == 0 || t.stride(0) >= block, "fused_softmax_ce: ", what,
              " rows overlap in memory (shape ", t.sizes(), ", strides ", t.strides(),
              "): a row's elements would be overwritten while another row still reads them; pass a tensor "
              "whose rows do not overlap (e.g. .contiguous())");
}

struct Prepared {
  CEParams p{};
  // Tensors the params point into, kept alive through the launch.
  at::Tensor logits, target, weight, weight_sum;
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, const RowOptions& o) {
  const double label_smoothing = o.label_smoothing;
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
  p.class_offset = o.class_offset;
  p.total_classes = o.total_classes < 0 ? p.classes : o.total_classes;
  TORCH_CHECK(p.class_offset >= 0 && p.class_offset + p.classes <= p.total_classes,
              "fused_softmax_ce: the shard's classes [", p.class_offset, ", ",
              p.class_offset + p.classes, ") must lie in [0, total_classes = ", p.total_classes, ")");
  TORCH_CHECK(std::isfinite(o.logit_scale) && o.logit_scale > 0,
              "fused_softmax_ce: logit_scale must be finite and > 0, got ", o.logit_scale);
  TORCH_CHECK(std::isfinite(o.softcap) && o.softcap >= 0,
              "fused_softmax_ce: softcap must be finite and > 0 (0 for none), got ", o.softcap);
  p.logit_scale = o.logit_scale;
  p.softcap = o.softcap;
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
  p.ignore_index = o.ignore_index;
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

void check_device_scalar(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == acc_type(logits) && t.device() == logits.device(),
              "fused_softmax_ce: ", name, " must be one ", acc_type(logits), " element on ",
              logits.device(), ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

// The forward's common tail: target check, per-row outputs (loss in the
// accumulation type, lse in float64, with stats the entropy in the
// accumulation type and the argmaxes in int64, else empty), scratch, launch.
ForwardOutputs forward_tail(const Kernels& k, Prepared& pr, bool stats, bool write_grad) {
  if (k.check_targets && pr.p.target_index) k.check_targets(pr.p);
  const auto opts = pr.logits.options().dtype(acc_type(pr.logits));
  at::Tensor loss = at::empty({pr.p.rows}, opts);
  at::Tensor lse = at::empty({pr.p.rows}, opts.dtype(at::kDouble));
  at::Tensor entropy = at::empty({stats ? pr.p.rows : 0}, opts);
  at::Tensor pred = at::empty({stats ? pr.p.rows : 0}, opts.dtype(at::kLong));
  at::Tensor target_pred =
      at::empty({stats && pr.p.target_prob ? pr.p.rows : 0}, opts.dtype(at::kLong));
  pr.p.loss = loss.data_ptr();
  pr.p.lse = lse.data_ptr();
  if (stats) {
    pr.p.entropy = entropy.data_ptr();
    pr.p.pred = pred.data_ptr<int64_t>();
    if (pr.p.target_prob) pr.p.target_pred = target_pred.data_ptr<int64_t>();
  }
  const int64_t bytes = k.forward_workspace ? k.forward_workspace(pr.p) : 0;
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({bytes}, pr.logits.options().dtype(at::kByte));
    pr.p.workspace = workspace.data_ptr();
  }
  if (pr.p.rows > 0) k.forward(pr.p, write_grad);
  return {loss, lse, entropy, pred, target_pred};
}

}  // namespace

ForwardOutputs run_forward(const Kernels& k, const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const RowOptions& o, bool stats) {
  Prepared pr = prepare(logits, target, weight, o);
  return forward_tail(k, pr, stats, /*write_grad=*/false);
}

at::Tensor run_backward(const Kernels& k, const at::Tensor& grad_output,
                        const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits,
                        const at::Tensor& target, const std::optional<at::Tensor>& weight,
                        const at::Tensor& lse, const std::optional<at::Tensor>& grad_entropy,
                        const std::optional<at::Tensor>& entropy, const RowOptions& o) {
  Prepared pr = prepare(logits, target, weight, o);
  check_rows_tensor(grad_output, pr.p.rows, acc_type(logits), logits, "grad_output");
  check_rows_tensor(lse, pr.p.rows, at::kDouble, logits, "lse");
  if (k.check_targets && pr.p.target_index) k.check_targets(pr.p);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor grad_lse_c;
  if (grad_lse.has_value()) {
    check_rows_tensor(*grad_lse, pr.p.rows, grad_lse->scalar_type(), logits, "grad_lse");
    grad_lse_c = grad_lse->to(acc_type(logits)).contiguous();
    pr.p.grad_lse = grad_lse_c.data_ptr();
  }
  at::Tensor grad_entropy_c, entropy_c;
  if (grad_entropy.has_value()) {
    TORCH_CHECK(entropy.has_value(), "fused_softmax_ce: grad_entropy needs the forward's entropy");
    check_rows_tensor(*grad_entropy, pr.p.rows, grad_entropy->scalar_type(), logits, "grad_entropy");
    check_rows_tensor(*entropy, pr.p.rows, acc_type(logits), logits, "entropy");
    grad_entropy_c = grad_entropy->to(acc_type(logits)).contiguous();
    entropy_c = entropy->contiguous();
    pr.p.grad_entropy = grad_entropy_c.data_ptr();
    pr.p.entropy = const_cast<void*>(entropy_c.data_ptr());
  }
  at::Tensor grad = gradient_like(pr.logits);
  pr.p.lse = const_cast<void*>(lse_c.data_ptr());
  pr.p.grad_output = grad_output.data_ptr();
  pr.p.grad_output_stride = grad_output.stride(0);
  pr.p.grad = grad.data_ptr();
  pr.p.grad_outer_stride = grad.dim() > 0 ? grad.stride(0) : 0;
  if (pr.p.rows > 0 && pr.p.classes > 0) k.backward(pr.p);
  return grad;
}

ForwardOutputs run_forward_inplace(const Kernels& k, const at::Tensor& logits,
                                   const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight,
                                   const at::Tensor& grad_scale,
                                   const std::optional<at::Tensor>& lse_grad_scale,
                                   const std::optional<at::Tensor>& token_weight, const RowOptions& o,
                                   bool stats) {
  TORCH_CHECK((logits.dim() == 2 || logits.dim() == 3) && blocks_contiguous(logits),
              "fused_softmax_ce: inplace_backward writes the gradient into the logits, so their "
              "class (and spatial) dimensions must be contiguous; got shape ",
              logits.sizes(), " with strides ", logits.strides());
  at::assert_no_internal_overlap(logits);
  check_rows_disjoint(logits, "inplace_backward writes the gradient into the logits, but their");
  Prepared pr = prepare(logits, target, weight, o);
  check_device_scalar(grad_scale, logits, "grad_scale");
  const at::Tensor scale = grad_scale.contiguous();
  at::Tensor lse_scale;
  if (lse_grad_scale.has_value()) {
    check_device_scalar(*lse_grad_scale, logits, "lse_grad_scale");
    lse_scale = lse_grad_scale->contiguous();
    pr.p.lse_grad_scale = lse_scale.data_ptr();
  }
  at::Tensor row_weight;
  if (token_weight.has_value()) {
    check_rows_tensor(*token_weight, pr.p.rows, acc_type(logits), logits, "token_weight");
    row_weight = token_weight->contiguous();
    pr.p.row_weight = row_weight.data_ptr();
  }
  pr.p.grad = logits.data_ptr();
  pr.p.grad_outer_stride = logits.stride(0);
  pr.p.grad_scale = scale.data_ptr();
  return forward_tail(k, pr, stats, /*write_grad=*/true);
}

void run_scale_grad(const Kernels& k, const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK((grad.dim() == 2 || grad.dim() == 3) && blocks_contiguous(grad),
              "fused_softmax_ce: grad must be 2-D or 3-D with contiguous class dimension, got "
              "shape ",
              grad.sizes(), " with strides ", grad.strides());
  at::assert_no_internal_overlap(grad);
  check_rows_disjoint(grad, "scale_grad_ scales grad in place, but its");
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
    p.grad_output_stride = 0;
  } else {
    TORCH_CHECK(grad_output.numel() == p.rows,
                "fused_softmax_ce: grad_output must hold one element or one per row (", p.rows,
                "), got shape ", grad_output.sizes());
    g = grad_output.reshape({p.rows});
    p.grad_output_stride = g.stride(0);
  }
  p.grad_output = g.data_ptr();
  if (p.rows > 0 && p.classes > 0) k.scale_rows(p);
}

}  // namespace fsce
