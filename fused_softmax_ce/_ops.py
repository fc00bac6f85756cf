"""Loads the compiled ops and registers their fake kernels and autograd."""
import torch

from . import _C  # noqa: F401  (importing it registers torch.ops.fused_softmax_ce)

ops = torch.ops.fused_softmax_ce


def acc_dtype(dtype):
    """The accumulation dtype of the kernels: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(logits):
    return logits.shape[0] * (logits.shape[2] if logits.dim() == 3 else 1)


@torch.library.register_fake("fused_softmax_ce::ce_forward")
def _ce_forward_fake(logits, target, weight, ignore_index, label_smoothing):
    rows = _rows(logits)
    return logits.new_empty(rows, dtype=acc_dtype(logits.dtype)), logits.new_empty(rows, dtype=torch.float64)


@torch.library.register_fake("fused_softmax_ce::ce_backward")
def _ce_backward_fake(grad_loss, logits, target, weight, lse, ignore_index, label_smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("fused_softmax_ce::ce_forward_inplace")
def _ce_forward_inplace_fake(logits, target, weight, grad_scale, ignore_index, label_smoothing):
    return logits.new_empty(_rows(logits), dtype=acc_dtype(logits.dtype))


@torch.library.register_fake("fused_softmax_ce::scale_grad_")
def _scale_grad_fake(grad, grad_output):
    return None


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing = inputs
    ctx.save_for_backward(logits, target, weight, output[1])
    ctx.ignore_index = ignore_index
    ctx.label_smoothing = label_smoothing


def _backward(ctx, grad_loss, _grad_lse):
    logits, target, weight, lse = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError("the derivative for 'weight' is not implemented.")
    grad_logits = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_logits = ops.ce_backward(
            grad_loss, logits, target, weight, lse, ctx.ignore_index, ctx.label_smoothing
        )
    if ctx.needs_input_grad[1]:
        # Soft targets: dloss/dt_j = -(1 - eps) * w_j * log p_j. Rare, so plain torch ops.
        shape = (logits.shape[0], 1) + tuple(logits.shape[2:])
        log_p = (logits.double() - lse.reshape(shape)).to(grad_loss.dtype)
        if weight is not None:
            log_p = log_p * weight.to(grad_loss.dtype).reshape((1, -1) + (1,) * (logits.dim() - 2))
        grad_target = (-(1.0 - ctx.label_smoothing) * log_p * grad_loss.reshape(shape)).to(target.dtype)
    return grad_logits, grad_target, None, None, None


torch.library.register_autograd(
    "fused_softmax_ce::ce_forward", _backward, setup_context=_setup_context
)
