"""Reductions of per-row values, PyTorch's way, on the device (no host sync)."""
import math

import torch


def mean_denominator(target_rows, weight, ignore_index, n_classes, dtype):
    """Sum of w[y] (or the count) over rows that are not ignored, on the device."""
    valid = target_rows != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    safe = target_rows.clamp(0, max(n_classes - 1, 0))
    w_y = weight.to(dtype).index_select(0, safe)
    return torch.where(valid, w_y, torch.zeros((), dtype=dtype, device=w_y.device)).sum()


def z_loss_rows(lse, valid, z_loss_scale, acc):
    """z_loss_scale * lse**2 per row, 0 on ignored rows (whose lse is 0)."""
    z = z_loss_scale * lse.to(acc) ** 2
    return z if valid is None else z * valid


def grad_scales(reduction, denominator, z_loss_scale, z_denominator, acc, device):
    """The factors that the in-place gradients fold in, in the accumulation
    dtype before rounding: the loss's (1/denominator for the mean, else 1),
    and the z-loss's per unit lse (2 * z_loss_scale, over z_denominator for
    the mean), or None without a z-loss."""
    one = torch.ones((), dtype=acc, device=device)
    mean = reduction == "mean"
    grad_scale = one / denominator if mean else one
    lse_grad_scale = 2 * z_loss_scale * (one / z_denominator if mean else one) if z_loss_scale else None
    return grad_scale, lse_grad_scale


def reduce_rows(rows, reduction, denominator):
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return nan_if_empty(total / denominator, denominator)


def nan_if_empty(mean, denominator):
    """PyTorch's mean over no weight (all rows ignored or weighted 0) is nan,
    also when label smoothing makes the sum non-zero."""
    if not torch.is_tensor(denominator):
        return mean
    return torch.where(denominator == 0, torch.full_like(mean, math.nan), mean)
