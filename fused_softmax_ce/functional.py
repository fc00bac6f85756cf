"""`cross_entropy`: the drop-in for `torch.nn.functional.cross_entropy`."""
import math

import torch
from torch.nn import _reduction as _Reduction

from ._checks import check_common, check_inplace, check_zero_dim_input, token_weight_rows
from ._derivatives import acc_dtype
from ._finish import RowStats, finish
from ._inplace import inplace_cross_entropy
from ._layout import is_rows_view, layout, resolve_target
from ._ops import cross_entropy_rows
from ._reduction import grad_scales, mean_denominator, reduce_rows, smoothed_nll_sum, target_logits, z_loss_rows
from .options import LossOptions
from .parallel.cross_entropy import vocab_parallel_cross_entropy


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
    token_weight=None,
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
    - ``return_stats``: return `CrossEntropyStats(loss, z_loss, lse, accuracy,
      entropy)`; the entropy of each row's softmax is differentiable (not
      with ``inplace_backward``).
    - ``token_weight``: a floating tensor shaped like the ``reduction="none"``
      loss (the target's, for class indices), without grad: each row's
      cross-entropy term (not the z-loss) is multiplied by its weight before
      the reduction; ``mean`` keeps its denominator. Negative weights (RL
      advantages) are allowed.
    - ``process_group``: vocab parallel; ``input`` (and ``weight``, and a
      probability target) hold this rank's contiguous slice of the classes,
      see `fused_softmax_ce.parallel`.
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    _Reduction.get_enum(reduction)  # ValueError on an unknown reduction, as PyTorch
    options = LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing, logit_scale=logit_scale,
                          softcap=softcap, z_loss_scale=z_loss_scale).checked()
    if process_group is not None:
        return vocab_parallel_cross_entropy(input, target, weight, reduction, options, inplace_backward,
                                            return_stats, process_group, token_weight)
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
    rows_view = is_rows_view(x)
    x3 = layout(x, rows_view)

    prob = target.shape == input.shape
    t, out_dtype, loss_shape, valid = resolve_target(input, target, weight, options.ignore_index, autocast,
                                                     rows_view)
    tw = token_weight_rows(token_weight, loss_shape, input.device, acc)
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
            denominator = mean_denominator(t, weight, options.ignore_index, n_classes, acc)
            if weight is not None and options.label_smoothing:
                v_y = target_logits(x3, t, valid, options)
        count = valid.sum().to(acc) if (options.z_loss_scale or return_stats) else None
    z_denominator = count if reduction == "mean" else None

    def nll_sum(lse):
        return None if v_y is None else smoothed_nll_sum(v_y, lse, t, weight, valid, options.label_smoothing, tw)

    if n_classes == 0 and prob:
        # -sum over no classes: PyTorch's zeros, and nothing for a kernel to do.
        loss_rows = x3.sum(1).reshape(-1).to(acc)
        lse = torch.full_like(loss_rows, -math.inf, dtype=torch.float64)
        entropy = torch.zeros_like(loss_rows)  # a sum over no classes
        row_stats = RowStats.no_classes(loss_rows)
        if tw is not None:
            loss_rows = loss_rows * tw
        loss = reduce_rows(loss_rows, reduction, denominator)
        z_loss = torch.zeros_like(loss)
    elif inplace:
        grad_scale, lse_grad_scale = grad_scales(reduction, denominator, options.z_loss_scale, z_denominator,
                                                 acc, input.device)
        loss, z_loss, lse, entropy, *row_stats = inplace_cross_entropy(
            x3, t, weight, grad_scale, lse_grad_scale, options, return_stats, reduction,
            denominator, valid, z_denominator, nll_sum, tw)
    else:
        loss_rows, lse, entropy, *row_stats = cross_entropy_rows(x3, t, weight, options, return_stats)
        if tw is not None:
            loss_rows = loss_rows * tw
        loss = reduce_rows(loss_rows, reduction, denominator, nll_sum(lse))
        if options.z_loss_scale:
            # A composition over the differentiable lse: its gradient reaches
            # the backward kernel as grad_lse, with no extra pass.
            z_loss = reduce_rows(z_loss_rows(lse, valid, options.z_loss_scale, acc), reduction, z_denominator)
            loss = loss + z_loss
        else:
            z_loss = torch.zeros_like(loss)

    return finish(loss, z_loss, lse, entropy, row_stats, reduction, loss_shape, out_dtype, return_stats, t, valid,
                  count)
