"""`cross_entropy`: the drop-in for `torch.nn.functional.cross_entropy`."""
import math
from typing import NamedTuple

import torch
from torch.nn import _reduction as _Reduction

from ._checks import (check_common, check_index_target, check_index_weight_dtype, check_inplace,
                      check_weight_not_differentiable, check_zero_dim_input, dtype_name, label_smoothing_value,
                      llm_option_values)
from ._derivatives import acc_dtype, effective_logits
from ._inplace import inplace_cross_entropy
from ._ops import cross_entropy_rows
from ._reduction import grad_scales, mean_denominator, reduce_rows, smoothed_nll_sum, target_logits, z_loss_rows


class CrossEntropyStats(NamedTuple):
    """What `cross_entropy(..., return_stats=True)` returns.

    loss: the loss, z-loss included. z_loss: the reduced z-loss term alone,
    for logging. lse: the per-row log-sum-exp of the effective logits, float32,
    shaped like the ``reduction="none"`` loss, differentiable (0 for ignored
    rows, which are not read). accuracy: the fraction of rows not ignored
    whose argmax equals the target class (the target's argmax for
    probability targets), float32, without grad.
    """

    loss: torch.Tensor
    z_loss: torch.Tensor
    lse: torch.Tensor
    accuracy: torch.Tensor


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
    logit_scale=1.0,
    softcap=None,
    z_loss_scale=0.0,
    return_stats=False,
    process_group=None,
):
    """Same arguments and results as `torch.nn.functional.cross_entropy`.

    Keyword-only extras (the defaults change nothing):

    - ``inplace_backward``: the forward writes the gradient into ``input``'s
      storage (its values are lost) and the backward only rescales it, so no
      N x C buffer is allocated. Only in effect when ``input`` requires grad
      and grad mode is on.
    - ``logit_scale``: the logits are multiplied by it before the softmax.
    - ``softcap``: the scaled logits u become ``softcap * tanh(u / softcap)``.
    - ``z_loss_scale``: adds ``z_loss_scale * lse**2`` per row not ignored,
      unweighted; ``mean`` divides it by the number of such rows.
    - ``return_stats``: return `CrossEntropyStats(loss, z_loss, lse, accuracy)`.
    - ``process_group``: vocab parallel; ``input`` (and ``weight``, and a
      probability target) hold this rank's contiguous slice of the classes,
      see `fused_softmax_ce.vocab_parallel`.
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    _Reduction.get_enum(reduction)  # ValueError on an unknown reduction, as PyTorch
    label_smoothing = label_smoothing_value(label_smoothing)
    logit_scale, softcap, z_loss_scale = llm_option_values(logit_scale, softcap, z_loss_scale)
    if process_group is not None:
        from .vocab_parallel import vocab_parallel_cross_entropy  # it imports this module's helpers
        return vocab_parallel_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, inplace_backward,
            logit_scale, softcap, z_loss_scale, return_stats, process_group)
    if input.dim() == 0:
        check_zero_dim_input(input, target)
    check_common(input, weight)
    # PyTorch runs cross_entropy in float32 under autocast. The kernels read
    # half-precision logits directly and accumulate in float32, so only the
    # result's dtype changes: no float32 copy of the logits is made.
    autocast = torch.is_autocast_enabled(input.device.type)
    acc = acc_dtype(input.dtype)

    batched = input.dim() > 1
    x = input if batched else input.unsqueeze(0)
    n_classes = x.shape[1]
    rows_view = _is_rows_view(x)
    x3 = _layout(x, rows_view)

    prob = target.shape == input.shape
    t, out_dtype, loss_shape, valid = resolve_target(input, target, weight, ignore_index, autocast, rows_view)
    inplace = inplace_backward and torch.is_grad_enabled() and input.requires_grad
    if inplace:
        check_inplace(input, t, weight)
    v_y = None
    if prob:
        # The mean of probability targets is over rows; PyTorch's is nan
        # without elements, also for rows of no classes.
        count = x3.shape[0] * (x3.shape[2] if x3.dim() == 3 else 1)
        denominator = count if n_classes else 0
    else:
        denominator = None
        if reduction == "mean":  # only the mean needs sum(w_y) over rows not ignored
            denominator = mean_denominator(t, weight, ignore_index, n_classes, acc)
            if weight is not None and label_smoothing:
                v_y = target_logits(x3, t, valid, lambda v: effective_logits(v, logit_scale, softcap))
        count = valid.sum().to(acc) if (z_loss_scale or return_stats) else None
    options = (ignore_index, label_smoothing, logit_scale, softcap)
    z_denominator = count if reduction == "mean" else None

    def nll_sum(lse):
        return None if v_y is None else smoothed_nll_sum(v_y, lse, t, weight, valid, label_smoothing)

    if n_classes == 0 and prob:
        # -sum over no classes: PyTorch's zeros, and nothing for a kernel to do.
        loss_rows = x3.sum(1).reshape(-1).to(acc)
        lse = torch.full_like(loss_rows, -math.inf, dtype=torch.float64)
        pred = target_pred = torch.zeros_like(loss_rows, dtype=torch.long)
        loss = reduce_rows(loss_rows, reduction, denominator)
        z_loss = torch.zeros_like(loss)
    elif inplace:
        grad_scale, lse_grad_scale = grad_scales(reduction, denominator, z_loss_scale, z_denominator, acc,
                                                 input.device)
        loss, z_loss, lse, pred, target_pred = inplace_cross_entropy(
            x3, t, weight, grad_scale, lse_grad_scale, options, return_stats, reduction,
            denominator, z_loss_scale, valid, z_denominator, nll_sum)
    else:
        loss_rows, lse, pred, target_pred = cross_entropy_rows(x3, t, weight, options, return_stats)
        loss = reduce_rows(loss_rows, reduction, denominator, nll_sum(lse))
        if z_loss_scale:
            # A composition over the differentiable lse: its gradient reaches
            # the backward kernel as grad_lse, with no extra pass.
            z_loss = reduce_rows(z_loss_rows(lse, valid, z_loss_scale, acc), reduction, z_denominator)
            loss = loss + z_loss
        else:
            z_loss = torch.zeros_like(loss)

    return finish(loss, z_loss, lse, reduction, loss_shape, out_dtype, return_stats, pred, target_pred, t,
                  valid, count)


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
        t = _layout(target if batched else target.unsqueeze(0), rows_view)
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


def finish(loss, z_loss, lse, reduction, loss_shape, out_dtype, return_stats, pred, target_pred, t, valid,
           count):
    """The loss in its output dtype and shape, or the CrossEntropyStats with
    the accuracy of pred over the rows not ignored (`count` of them): against
    the index target t, or for probability targets (valid None) against
    their argmax target_pred."""
    if reduction == "none":
        loss, z_loss = loss.reshape(loss_shape), z_loss.reshape(loss_shape)
    loss = loss.to(out_dtype)
    if not return_stats:
        return loss
    with torch.no_grad():
        hits = pred == (target_pred if valid is None else t)
        if valid is not None:
            hits = hits & valid
        accuracy = (hits.sum().to(torch.float32) / count).to(torch.float32)
    return CrossEntropyStats(loss, z_loss.to(out_dtype), lse.to(torch.float32).reshape(loss_shape), accuracy)


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
