"""Vocab-parallel `cross_entropy(..., process_group=group)`: the kernels on
this rank's slice of the classes, combined by one all_gather (shards.py)."""
import math

import torch

from .. import _derivatives as D
from .._checks import check_common, check_inplace, token_weight_rows
from .._derivatives import acc_dtype
from .._finish import finish
from .._inplace import refuse_statistics_gradients, scale_saved_grad_once
from .._layout import is_rows_view, layout, resolve_target
from .._ops import ops
from .shards import (combine_shards, group_of, reducer, refuse_create_graph, shard_grad_lse, shard_of, stat_columns,
                     target_values)

# The in-place mode writes the exact gradient into the logits in row chunks
# of about this many elements: the only N x C-sized memory it allocates.
INPLACE_CHUNK = 1 << 22


def _gather_rows(x3, target, weight, options, stats, group, shard, agreed, nll, token_weight):
    """Runs the shard's forward, then `combine_shards` (nll: with the
    smoothed mean's nll part)."""
    loss_k, lse_k, entropy_k, *row_stats = ops.ce_forward(x3, target, weight, *options.op_args(), stats, *shard)
    cols = stat_columns(x3, target, lse_k, entropy_k, row_stats, options, shard) if stats else []
    v_y = target_values(x3, target, options, shard) if nll else None
    return combine_shards(loss_k, lse_k, cols, row_stats, target, weight, options, group, shard, x3.shape[1],
                          agreed, v_y, token_weight)


class VocabParallelFn(torch.autograd.Function):
    """(loss_rows, lse, entropy, w_y_sum, nll_sum, *the row statistics) of
    the global rows; the gradient reaches this rank's logits and
    probability-target shard."""

    @staticmethod
    def forward(ctx, x3, target, weight, options, stats, group, shard, agreed, nll, token_weight):
        loss, lse, entropy, A_rest, w_y_sum, nll_sum, row_stats = _gather_rows(
            x3, target, weight, options, stats, group, shard, agreed, nll, token_weight)
        ctx.save_for_backward(x3, target, weight, lse, entropy, A_rest)
        ctx.options, ctx.shard = options, shard
        ctx.mark_non_differentiable(*row_stats)
        ctx.mark_non_differentiable(*(t for t in (w_y_sum, nll_sum) if t is not None))
        ctx.set_materialize_grads(False)
        return loss, lse, entropy, w_y_sum, nll_sum, *row_stats

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_entropy, *_):
        refuse_create_graph()
        x3, target, weight, lse, entropy, A_rest = ctx.saved_tensors
        if entropy.numel() == 0:  # no stats: a gradient for the empty entropy (aot's zeros) is dropped
            grad_entropy = None
        none = (None,) * 7
        if ctx.needs_input_grad[2] and not target.is_floating_point():
            raise RuntimeError("the derivative for 'weight' is not implemented.")
        if grad_loss is None and grad_lse is None and grad_entropy is None:
            return (None, None, None) + none
        acc = acc_dtype(x3.dtype)
        g = torch.zeros_like(lse, dtype=acc) if grad_loss is None else grad_loss.to(acc)
        # The other shards' part of g A, so that the kernel's gradient
        # coefficient is the whole row's.
        h = g.double() * A_rest
        if grad_lse is not None:
            h = h + grad_lse.double()
        grad_x = grad_t = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.ce_backward(g, h.to(acc), x3, target, weight, lse, *ctx.options.op_args(), grad_entropy,
                                     None if grad_entropy is None else entropy, *ctx.shard)
        eps = ctx.options.label_smoothing
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            v = D.effective_logits(x3, ctx.options)
        if ctx.needs_input_grad[1]:
            grad_t = D.target_grad(v, lse, weight, eps, D.rows(g, x3)).to(target.dtype)
        if ctx.needs_input_grad[2]:  # the shard's classes, against the global lse
            terms = D.weight_terms(v, lse, target, eps, ctx.shard.total_classes)
            grad_w = D.weight_grad(terms, D.rows(g, x3)).to(weight.dtype)
        return (grad_x, grad_t, grad_w) + none


class InplaceVocabParallelFn(torch.autograd.Function):
    """In-place mode on a shard: the forward writes the gradient of the
    reduced loss (z-loss included) into the logits' storage, exactly, with
    the global lse, in row chunks; the backward only rescales it. Returns
    (loss, z_loss, lse, entropy, *the row statistics); only `loss` is
    differentiable (a gradient reaching z_loss, lse or the entropy raises).
    token_weight (per row) or None weighs each row's cross-entropy term, in
    the loss and in the gradient written."""

    @staticmethod
    def forward(ctx, x3, target, weight, options, stats, group, shard, agreed, reduce, token_weight):
        loss_rows, lse, entropy, A_rest, w_y_sum, nll_sum, row_stats = _gather_rows(
            x3, target, weight, options, stats, group, shard, agreed, reduce.needs_nll, token_weight)
        if token_weight is not None:
            loss_rows = loss_rows * token_weight
        loss, z_loss, grad_scale, lse_grad_scale = reduce(loss_rows, lse, w_y_sum, nll_sum)
        acc = acc_dtype(x3.dtype)
        g = grad_scale.to(acc).expand(lse.shape)
        if token_weight is not None:
            g = g * token_weight
        h = shard_grad_lse(g, A_rest, lse, lse_grad_scale, acc)
        inner = x3.shape[2] if x3.dim() == 3 else 1
        step = max(1, INPLACE_CHUNK // (x3.shape[1] * inner))
        for i in range(0, x3.shape[0], step):
            rows = slice(i * inner, (i + step) * inner)
            t = target[i:i + step] if target.is_floating_point() else target[rows]
            x3[i:i + step].copy_(ops.ce_backward(
                g[rows], h[rows], x3[i:i + step], t, weight, lse[rows], *options.op_args(), None, None, *shard))
        torch.autograd.graph.increment_version(x3)
        ctx.save_for_backward(x3)
        ctx.backward_done = False
        ctx.mark_non_differentiable(*row_stats)
        ctx.set_materialize_grads(False)
        return loss, z_loss, lse, entropy, *row_stats

    @staticmethod
    def backward(ctx, grad_loss, grad_z_loss, grad_lse, grad_entropy, *_):
        refuse_statistics_gradients(grad_z_loss, grad_lse, grad_entropy)
        refuse_create_graph()
        return (scale_saved_grad_once(ctx, grad_loss),) + (None,) * 9


def vocab_parallel_cross_entropy(input, target, weight, reduction, options, inplace_backward, return_stats,
                                 process_group, token_weight=None):
    """`cross_entropy(..., process_group=group)` for checked `LossOptions`:
    input holds this rank's contiguous slice of the classes, weight (if any)
    the same slice, a probability target the same slice; an index target
    holds global classes."""
    check_common(input, weight)
    if input.dim() < 2:
        raise ValueError(
            f"vocab-parallel cross_entropy expects input of shape (N, C_local, ...), got {list(input.shape)}")
    group = group_of(process_group)
    autocast = torch.is_autocast_enabled(input.device.type)
    acc = acc_dtype(input.dtype)
    n, n_classes, spatial = input.shape[0], input.shape[1], tuple(input.shape[2:])
    rows_view = is_rows_view(input)
    x3 = layout(input, rows_view)
    t, out_dtype, loss_shape, valid = resolve_target(input, target, weight, options.ignore_index, autocast,
                                                     rows_view)
    tw = token_weight_rows(token_weight, loss_shape, input.device, acc)
    inplace = inplace_backward and torch.is_grad_enabled() and input.requires_grad
    if inplace:
        check_inplace(input, t, weight)  # before any collective: every rank fails alike
    rows = n * math.prod(spatial)
    shard, agreed = shard_of(group, n_classes, rows, input.device)
    count = torch.full((), rows, dtype=acc, device=input.device) if valid is None else valid.sum().to(acc)

    reduce = reducer(reduction, weight, valid, count, options, acc)
    if inplace:
        loss, z_loss, lse, entropy, *row_stats = InplaceVocabParallelFn.apply(
            x3, t, weight, options, return_stats, group, shard, agreed, reduce, tw)
    else:
        loss_rows, lse, entropy, w_y_sum, nll_sum, *row_stats = VocabParallelFn.apply(
            x3, t, weight, options, return_stats, group, shard, agreed, reduce.needs_nll, tw)
        if tw is not None:
            loss_rows = loss_rows * tw
        loss, z_loss = reduce(loss_rows, lse, w_y_sum, nll_sum)[:2]
    return finish(loss, z_loss, lse, entropy, row_stats, reduction, loss_shape, out_dtype, return_stats, t, valid,
                  count)
