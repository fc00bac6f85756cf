"""`cross_entropy`: the drop-in for `torch.nn.functional.cross_entropy`."""
import math

import torch
from torch.nn import _reduction as _Reduction

from ._ops import acc_dtype, ops

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_index_target(input, target):
    """PyTorch's nll_loss checks, with its messages and exception types."""
    if input.dim() == 1:
        if target.numel() != 1 or target.dim() > 1:
            raise ValueError(
                f"Expected input batch_size (1) to match target batch_size ({target.numel()})."
            )
    elif target.dim() == 0 or input.shape[0] != target.shape[0]:
        got = target.shape[0] if target.dim() > 0 else 0
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({got}).")
    elif tuple(target.shape) != (input.shape[0],) + tuple(input.shape[2:]):
        expected = [input.shape[0]] + list(input.shape[2:])
        raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    if target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_dtype_name(target.dtype)}")


def _dtype_name(dtype):
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16", torch.int32: "Int", torch.int16: "Short",
            torch.int8: "Char", torch.bool: "Bool", torch.long: "Long"}.get(dtype, str(dtype))


def _check_common(input, weight, label_smoothing):
    if input.dim() == 0:
        raise ValueError("Expected 1 or more dimensions (got 0)")
    if input.dtype not in _FLOAT_DTYPES:
        raise NotImplementedError(
            f"cross_entropy: input dtype {input.dtype} is not supported; expected one of "
            "float32, float64, float16, bfloat16"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if weight is not None:
        n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
        if weight.dim() != 1 or weight.numel() != n_classes:
            raise RuntimeError(
                f"weight tensor should be defined either for all {n_classes} classes or no "
                f"classes but got weight tensor of shape: {list(weight.shape)}"
            )
        if weight.dtype != input.dtype:
            raise RuntimeError(
                f"expected scalar type {_dtype_name(input.dtype)} but found "
                f"{_dtype_name(weight.dtype)} (weight)"
            )
        if weight.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but weight is on "
                f"{weight.device} and input is on {input.device}"
            )


def _mean_denominator(target_rows, weight, ignore_index, n_classes, dtype):
    """Sum of w[y] (or the count) over rows that are not ignored, on the device."""
    valid = target_rows != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    safe = target_rows.clamp(0, max(n_classes - 1, 0))
    w_y = weight.to(dtype).index_select(0, safe)
    return torch.where(valid, w_y, torch.zeros((), dtype=dtype, device=w_y.device)).sum()


class _InplaceCrossEntropy(torch.autograd.Function):
    """The forward writes the gradient into the logits; the backward only scales it."""

    @staticmethod
    def forward(ctx, logits, target, weight, grad_scale, ignore_index, label_smoothing, reduction):
        loss = ops.ce_forward_inplace(logits, target, weight, grad_scale, ignore_index, label_smoothing)
        # Custom C++ ops do not bump the version counter; doing it here makes
        # autograd raise if anything saved the logits for its own backward.
        torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(logits)
        if reduction == "none":
            return loss
        return loss.sum() * grad_scale if reduction == "mean" else loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        ops.scale_grad_(grad, grad_output.contiguous())
        return grad, None, None, None, None, None, None


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
    *,
    inplace_backward=False,
):
    """Same arguments and results as `torch.nn.functional.cross_entropy`.

    With ``inplace_backward=True`` the forward writes the gradient into
    ``input``'s storage (its values are lost) and the backward only rescales
    it, so no N x C buffer is allocated. Only in effect when ``input``
    requires grad and grad mode is on.
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    _Reduction.get_enum(reduction)  # ValueError on an unknown reduction, as PyTorch
    _check_common(input, weight, label_smoothing)

    batched = input.dim() > 1
    x = input if batched else input.unsqueeze(0)
    n, n_classes = x.shape[0], x.shape[1]
    spatial = tuple(x.shape[2:])
    x3 = x if x.dim() == 2 else x.reshape(n, n_classes, math.prod(spatial))

    if target.shape == input.shape:
        if not target.is_floating_point():
            raise RuntimeError(
                f"Expected floating point type for target with class probabilities, got "
                f"{_dtype_name(target.dtype)}"
            )
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        out_dtype = torch.result_type(input, target)
        t = target if batched else target.unsqueeze(0)
        t = t.to(input.dtype).reshape(x3.shape)
        loss_shape = (n,) + spatial if batched else ()
        denominator = n * math.prod(spatial)  # the mean of probability targets is over rows
    else:
        _check_index_target(input, target)
        out_dtype = input.dtype
        loss_shape = tuple(target.shape)
        t = target.reshape(-1).long()
        denominator = None
        if reduction == "mean":  # only the mean needs sum(w_y) over rows not ignored
            denominator = _mean_denominator(t, weight, ignore_index, n_classes, acc_dtype(input.dtype))

    acc = acc_dtype(input.dtype)
    if inplace_backward and torch.is_grad_enabled() and input.requires_grad:
        scale = torch.ones((), dtype=acc, device=input.device)
        if reduction == "mean":
            # 1/denominator is folded into the gradient in fp32 before rounding.
            scale = scale / denominator
        out = _InplaceCrossEntropy.apply(x3, t, weight, scale, ignore_index, label_smoothing, reduction)
        return (out.reshape(loss_shape) if reduction == "none" else out).to(out_dtype)

    loss, _ = ops.ce_forward(x3, t, weight, ignore_index, label_smoothing)
    if reduction == "none":
        return loss.reshape(loss_shape).to(out_dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    return (total / denominator).to(out_dtype)
