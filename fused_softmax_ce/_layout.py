"""Logits and targets in the ops' layout: 2-D (N, C) rows or 3-D (N, C, S)
blocks, with PyTorch's target checks."""
import math

import torch

from ._checks import check_index_target, check_index_weight_dtype, check_weight_not_differentiable, dtype_name


def resolve_target(input, target, weight, ignore_index, autocast, rows_view):
    """PyTorch's target checks, then (target in the ops' layout, output dtype,
    the reduction="none" shape, rows not ignored or None for probabilities)."""
    batched = input.dim() > 1
    if target.shape == input.shape:
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
        t = layout(target if batched else target.unsqueeze(0), rows_view)
        loss_shape = (input.shape[0],) + tuple(input.shape[2:]) if batched else ()
        valid = None
    else:
        check_index_target(input, target)
        if weight is not None:
            check_index_weight_dtype(input, weight, autocast)
            check_weight_not_differentiable(weight)
        out_dtype = input.dtype
        loss_shape = tuple(target.shape) if batched else ()
        t = target.reshape(-1).long()
        valid = t != ignore_index
    if autocast and out_dtype != torch.float64:
        out_dtype = torch.float32  # PyTorch runs cross_entropy in float32 under autocast
    return t, out_dtype, loss_shape, valid


def is_rows_view(x):
    """True for (N, C, d1..dk) whose class dimension has stride 1 and whose
    other dimensions flatten without a copy, such as a (B, T, V) output
    transposed to (B, V, T): its rows are contiguous, so they take the row
    kernels as (N * S, C) instead of being copied into (N, C, S)."""
    if x.dim() == 2 or x.shape[1] <= 1 or x.stride(1) != 1:
        return False
    rest = [(size, stride) for k, (size, stride) in enumerate(zip(x.shape, x.stride())) if k != 1 and size != 1]
    return all(rest[i][1] == rest[i + 1][1] * rest[i + 1][0] for i in range(len(rest) - 1))


def layout(x, rows_view):
    """x (N, C, d1..dk) as the 2-D (N, C) or 3-D (N, C, S) tensor the ops take."""
    if x.dim() == 2:
        return x
    n_classes = x.shape[1]
    if rows_view:
        return x.movedim(1, -1).reshape(-1, n_classes)
    return x.reshape(x.shape[0], n_classes, math.prod(x.shape[2:]))
