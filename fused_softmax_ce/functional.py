"""`cross_entropy`: the drop-in for `torch.nn.functional.cross_entropy`."""
import math

import torch
from torch.nn import _reduction as _Reduction

from ._checks import check_common, check_index_target, check_index_weight_dtype, check_inplace, dtype_name
from ._derivatives import acc_dtype
from ._inplace import inplace_cross_entropy
from ._ops import cross_entropy_rows


def _mean_denominator(target_rows, weight, ignore_index, n_classes, dtype):
    """Sum of w[y] (or the count) over rows that are not ignored, on the device."""
    valid = target_rows != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    safe = target_rows.clamp(0, max(n_classes - 1, 0))
    w_y = weight.to(dtype).index_select(0, safe)
    return torch.where(valid, w_y, torch.zeros((), dtype=dtype, device=w_y.device)).sum()


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
    check_common(input, weight, label_smoothing)
    # PyTorch runs cross_entropy in float32 under autocast. The kernels read
    # half-precision logits directly and accumulate in float32, so only the
    # result's dtype changes: no float32 copy of the logits is made.
    autocast = torch.is_autocast_enabled(input.device.type)

    batched = input.dim() > 1
    x = input if batched else input.unsqueeze(0)
    n, n_classes = x.shape[0], x.shape[1]
    spatial = tuple(x.shape[2:])
    rows_view = _is_rows_view(x)
    x3 = _layout(x, rows_view)

    prob = target.shape == input.shape
    if prob:
        if not target.is_floating_point():
            raise RuntimeError(
                f"Expected floating point type for target with class probabilities, got "
                f"{dtype_name(target.dtype)}"
            )
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
        t = target if batched else target.unsqueeze(0)
        t = _layout(t, rows_view)
        loss_shape = (n,) + spatial if batched else ()
        denominator = n * math.prod(spatial)  # the mean of probability targets is over rows
    else:
        check_index_target(input, target)
        if weight is not None:
            check_index_weight_dtype(input, weight, autocast)
        out_dtype = input.dtype
        loss_shape = tuple(target.shape)
        t = target.reshape(-1).long()
        denominator = None
        if reduction == "mean":  # only the mean needs sum(w_y) over rows not ignored
            denominator = _mean_denominator(t, weight, ignore_index, n_classes, acc_dtype(input.dtype))
    if autocast and out_dtype != torch.float64:
        out_dtype = torch.float32

    if n_classes == 0 and prob:
        # -sum over no classes: PyTorch's zeros, and nothing for a kernel to do.
        loss = x3.sum(1).reshape(-1).to(acc_dtype(input.dtype))
    elif inplace_backward and torch.is_grad_enabled() and input.requires_grad:
        check_inplace(input)
        scale = torch.ones((), dtype=acc_dtype(input.dtype), device=input.device)
        if reduction == "mean":
            # 1/denominator is folded into the gradient in fp32 before rounding.
            scale = scale / denominator
        out = inplace_cross_entropy(x3, t, weight, scale, ignore_index, label_smoothing, reduction)
        return (out.reshape(loss_shape) if reduction == "none" else _nan_if_empty(out, denominator)).to(out_dtype)
    else:
        loss, _ = cross_entropy_rows(x3, t, weight, ignore_index, label_smoothing)
    if reduction == "none":
        return loss.reshape(loss_shape).to(out_dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    return _nan_if_empty(total / denominator, denominator).to(out_dtype)


def _nan_if_empty(mean, denominator):
    """PyTorch's mean over no weight (all rows ignored or weighted 0) is nan,
    also when label smoothing makes the sum non-zero."""
    if not torch.is_tensor(denominator):
        return mean
    return torch.where(denominator == 0, torch.full_like(mean, math.nan), mean)


def _is_rows_view(x):
    """True for (N, C, d1..dk) whose class dimension has stride 1 and whose
    other dimensions flatten without a copy, such as a (B, T, V) output
    transposed to (B, V, T): its rows are contiguous, so they take the row
    kernels as (N * S, C) instead of being copied into (N, C, S)."""
    if x.dim() == 2 or x.shape[1] <= 1 or x.stride(1) != 1:
        return False
    rest = [(size, stride) for k, (size, stride) in enumerate(zip(x.shape, x.stride())) if k != 1 and size != 1]
    return all(rest[i][1] == rest[i + 1][1] * rest[i + 1][0] for i in range(len(rest) - 1))


def _layout(x, rows_view):
    """x (N, C, d1..dk) as the 2-D (N, C) or 3-D (N, C, S) tensor the ops take."""
    if x.dim() == 2:
        return x
    n_classes = x.shape[1]
    if rows_view:
        return x.movedim(1, -1).reshape(-1, n_classes)
    return x.reshape(x.shape[0], n_classes, math.prod(x.shape[2:]))
