"""Reductions of per-row values, PyTorch's way, on the device (no host sync)."""
import torch

from ._derivatives import effective_logits


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


def reduce_rows(rows, reduction, denominator, nll_sum=None):
    """rows reduced; for the mean of a smoothed loss, nll_sum is its (1 - eps)
    weighted-nll part (see smoothed_nll_sum). PyTorch divides that part and
    the smoothing part by the denominator separately, which only matters when
    it is 0: nan for no weight at all, an infinity for weights summing to 0."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    mean = total / denominator
    if nll_sum is None:
        return mean
    return torch.where(denominator == 0, nll_sum / denominator + (total - nll_sum) / denominator, mean)


def target_logits(x3, target, valid, options):
    """The effective logit at each row's target class (float64, without grad;
    0 on ignored rows), read before an in-place kernel overwrites them."""
    with torch.no_grad():
        idx = torch.where(valid, target, 0).reshape((x3.shape[0], 1) + tuple(x3.shape[2:]))
        return effective_logits(x3.gather(1, idx), options).reshape(-1).double() * valid


def smoothed_nll_sum(v_y, lse, target, weight, valid, label_smoothing, token_weight=None):
    """(1 - eps) * sum of w_y (lse - v_y) (times the rows' token weights) over
    rows not ignored, without grad."""
    with torch.no_grad():
        w_y = weight.double()[torch.where(valid, target, 0)] * valid
        if token_weight is not None:
            w_y = w_y * token_weight.double()
        return (1 - label_smoothing) * (w_y * (lse.double() - v_y)).sum()
