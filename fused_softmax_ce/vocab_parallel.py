"""Vocab-parallel cross-entropy: the classes of every row sharded across the
ranks of a torch.distributed process group.

Rank k holds the contiguous classes [offset_k, offset_k + C_k) of every row
(in rank order); targets are global class indices. The kernels run on the
shard with its global offset, which gives per row the shard's lse_k, its loss
L_k computed against lse_k, and the shard's part of
A = coef_y + k * sum_a (csrc/row_math.h):

    A_k = coef_y [y in shard k] + k * sum_{j in shard k} a_j

Since the loss is coef_y (lse - v_y) + k (sum_a lse - sum_a v), with
lse = logsumexp_k lse_k it is

    loss = sum_k L_k + sum_k A_k (lse - lse_k)

so ONE all_gather of (lse_k, L_k, A_k) per row gives every rank the exact
loss. The backward needs no collective: the kernel's gradient with the
global lse and grad_lse = g (A - A_k) has the gradient coefficient g A of
the whole row, which is dloss/dz of the shard exactly.

Per forward: one all_gather of 2 int64 (the shard sizes and row count, so
that a disagreement fails clearly instead of crashing the collective) and
one all_gather of float64 slots: per row lse_k, and (L_k, A_k) in the
accumulation type (one slot for float32, two for float64), so 16 R bytes per
rank (24 R for float64 logits); +16 R with stats, +16 R more with stats and
probability targets, +8 with class weights. None in the backward.

The vocab-parallel linear_cross_entropy (vocab_parallel_linear.py) runs the
kernels on chunks of its logits and shares the rest: `combine_shards` and
`reducer`.
"""
import math

import torch
import torch.distributed as dist

from . import _derivatives as D
from ._checks import check_common, check_inplace
from ._derivatives import acc_dtype
from ._inplace import scale_saved_grad_once
from ._ops import ops
from ._reduction import grad_scales, reduce_rows, z_loss_rows

_SHARDS = {}  # (group, local classes) -> (class_offset, total_classes, sizes of all ranks)

# The in-place mode writes the exact gradient into the logits in row chunks
# of about this many elements: the only N x C-sized memory it allocates.
INPLACE_CHUNK = 1 << 22


def _group(process_group):
    return dist.group.WORLD if process_group is None else process_group


def shard_of(group, n_classes, rows, device):
    """(class_offset, total_classes, agreed) of this rank; agreed is a device
    bool that `combine_shards` shares, so that every rank raises alike.

    The 2-value all_gather runs on every call, so that ranks that disagree on
    the row count fail here, on the device and without a host sync, rather
    than in the payload all_gather (whose sizes would not match). On the CPU
    the sizes are read every call (no sync to avoid), so a group may change
    its class split. Elsewhere they are read to the host once per (group,
    local class count) and cached; a rank that finds them changed since
    (another class split of the group that repeats its local count) cannot
    raise at once, or the others would wait for it in the payload all_gather:
    its disagreement travels there instead, and every rank raises.
    """
    world = dist.get_world_size(group)
    mine = torch.full((1, 2), rows, dtype=torch.long, device=device)  # fills, not a host copy
    mine[0, 0] = n_classes
    every = mine.new_empty(world, 2)
    dist.all_gather_single(every, mine, group=group)
    key = (group, n_classes)
    if key not in _SHARDS or device.type == "cpu":
        sizes = every.tolist()  # once per key off the CPU: the only host read
        row_counts = [r for _, r in sizes]
        if len(set(row_counts)) != 1:
            raise ValueError(
                f"vocab-parallel cross-entropy: the ranks of process_group disagree on the number "
                f"of rows: got {row_counts} (rank order); every rank must hold the same rows"
            )
        classes = [c for c, _ in sizes]
        if any(c < 1 for c in classes):
            raise ValueError(
                f"vocab-parallel cross-entropy: every rank must hold at least one class, got "
                f"class slices of sizes {classes} (rank order)"
            )
        rank = dist.get_rank(group)
        _SHARDS[key] = (sum(classes[:rank]), sum(classes), every[:, 0].clone())
    offset, total, classes = _SHARDS[key]
    # Every rank sees the same sizes, so every rank fails alike here (a rank
    # that read them above raised its ValueError for these).
    torch._assert_async((every[:, 1] == rows).all() & (every[:, 0] >= 1).all(),
                        "vocab-parallel cross-entropy: the ranks of process_group disagree on the number of "
                        "rows, or one holds no class")
    return offset, total, (every[:, 0] == classes).all()


def _shard_coefficient(target, weight, label_smoothing, ignore_index, offset, total, n_classes):
    """A_k per row (float64): this shard's part of A = coef_y + k sum_a, and
    for class-index targets this shard's w_y (0 when y is elsewhere)."""
    eps = label_smoothing
    sum_w = float(n_classes) if weight is None else weight.double().sum()
    if target.is_floating_point():
        t = target.double()
        ta = t.sum(1) if weight is None else (t * weight.double().reshape(D.class_shape(t))).sum(1)
        return (1 - eps) * ta.reshape(-1) + (eps / total) * sum_w, None
    valid = target != ignore_index
    here = valid & (target >= offset) & (target < offset + n_classes)
    local = (target - offset).clamp(0, n_classes - 1)
    w_y = here.double() if weight is None else torch.where(here, weight.double()[local], 0.0)
    return (1 - eps) * w_y + (eps / total) * sum_w * valid.double(), w_y


def _first_max(values, index):
    """Per row, the index of the rank holding the largest value (the first on
    ties: the lowest class index), given (world, R) values and indices."""
    return index.gather(0, values.argmax(0, keepdim=True)).squeeze(0)


def _value_at(x3, index, options):
    """The effective logit at a per-row class index of the shard (O(R))."""
    idx = index.clamp(min=0).reshape(D.row_shape(x3))
    return D.effective_logits(x3.gather(1, idx), *options[2:4]).reshape(-1).double()


def stat_columns(x3, target, pred, target_pred, options, offset):
    """The per-row values the stats gather (float64): the shard's max effective
    logit and its argmax, and for probability targets the target's."""
    cols = [_value_at(x3, pred - offset, options), pred.double()]
    if target.is_floating_point():
        t_max = target.gather(1, (target_pred - offset).reshape(D.row_shape(x3))).reshape(-1)
        cols += [t_max.double(), target_pred.double()]
    return cols


def _gather_rows(x3, target, weight, options, stats, group, offset, total, agreed):
    """Runs the shard's forward, then `combine_shards`."""
    loss_k, lse_k, pred, target_pred = ops.ce_forward(x3, target, weight, *options, stats, offset, total)
    cols = stat_columns(x3, target, pred, target_pred, options, offset) if stats else []
    return combine_shards(loss_k, lse_k, cols, pred, target_pred, target, weight, options, group, offset,
                          total, x3.shape[1], agreed)


def combine_shards(loss_k, lse_k, cols, pred, target_pred, target, weight, options, group, offset, total,
                   n_classes, agreed):
    """The all_gather of the shard's per-row (lse_k, L_k, A_k) and stat
    columns: (loss_rows, lse, A - A_k, pred, target_pred, sum of w_y or
    None), all global; pred and target_pred pass through without stats."""
    ignore_index, label_smoothing = options[:2]
    A_k, w_y = _shard_coefficient(target, weight, label_smoothing, ignore_index, offset, total, n_classes)
    # (L_k, A_k) travel in the accumulation type, the kernels' own precision:
    # for float32 the pair is one float64 slot. lse_k and the stats are float64.
    pair = torch.stack([loss_k, A_k.to(loss_k.dtype)], 1).view(torch.float64).reshape(-1)
    rows = lse_k.numel()
    extra = [w_y.sum().reshape(1)] if w_y is not None and weight is not None else []
    payload = torch.cat([lse_k, pair] + cols + extra + [agreed.double().reshape(1)])
    world = dist.get_world_size(group)
    every = payload.new_empty(world, payload.numel())
    dist.all_gather_single(every, payload.unsqueeze(0), group=group)
    torch._assert_async(
        (every[:, -1] == 1).all(),
        "vocab-parallel cross-entropy: the class slices of process_group's ranks differ from those a "
        "rank first saw for its local class count on this group (a second class split of the group "
        "must not repeat a rank's local class count)",
    )
    every = every[:, :-1]
    lse_all = every[:, :rows]
    pairs = every[:, rows:rows + pair.numel()].view(loss_k.dtype).reshape(world, rows, 2).double()
    loss_all, A_all = pairs[..., 0], pairs[..., 1]
    per_row = every[:, rows + pair.numel():rows + pair.numel() + len(cols) * rows].reshape(world, len(cols), rows)
    lse = torch.logsumexp(lse_all, 0)
    if not target.is_floating_point():
        lse = torch.where(target != ignore_index, lse, 0.0)  # the kernels' 0 for ignored rows
    # A shard whose A_k is 0 adds nothing, also where its lse_k is -inf.
    shift = torch.where(A_all != 0, A_all * (lse - lse_all), 0.0)
    loss = (loss_all.sum(0) + shift.sum(0)).to(loss_k.dtype)
    A_rest = A_all.sum(0) - A_all[dist.get_rank(group)]
    if cols:
        pred = _first_max(per_row[:, 0], per_row[:, 1]).long()
        if target.is_floating_point():
            target_pred = _first_max(per_row[:, 2], per_row[:, 3]).long()
    w_y_sum = every[:, -1].sum() if extra else None
    return loss, lse, A_rest, pred, target_pred, w_y_sum


def shard_grad_lse(g, A_rest, lse, lse_grad, acc):
    """The backward kernel's grad_lse for a shard: the other shards' part of
    g A, so that the kernel's gradient coefficient is the whole row's, plus
    the z-loss's lse_grad * lse (lse_grad per unit lse, or None; the lse is 0
    on ignored rows)."""
    h = g.double() * A_rest
    if lse_grad is not None:
        h = h + lse_grad * lse
    return h.to(acc)


def _refuse_create_graph():
    # The gradient is computed by the kernel, not by differentiable ops: a
    # second-order term through it would silently be zero.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "cross_entropy and linear_cross_entropy with process_group do not support higher-order "
            "gradients (create_graph=True); their gradient is not itself differentiable"
        )


class VocabParallelFn(torch.autograd.Function):
    """(loss_rows, lse, pred, target_pred, w_y_sum) of the global rows; the
    gradient reaches this rank's logits and probability-target shard."""

    @staticmethod
    def forward(ctx, x3, target, weight, options, stats, group, offset, total, agreed):
        loss, lse, A_rest, pred, target_pred, w_y_sum = _gather_rows(
            x3, target, weight, options, stats, group, offset, total, agreed)
        ctx.save_for_backward(x3, target, weight, lse, A_rest)
        ctx.options = (*options, offset, total)
        ctx.mark_non_differentiable(pred, target_pred)
        if w_y_sum is not None:
            ctx.mark_non_differentiable(w_y_sum)
        ctx.set_materialize_grads(False)
        return loss, lse, pred, target_pred, w_y_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, *_):
        _refuse_create_graph()
        x3, target, weight, lse, A_rest = ctx.saved_tensors
        none = (None,) * 6
        if ctx.needs_input_grad[2] and not target.is_floating_point():
            raise RuntimeError("the derivative for 'weight' is not implemented.")
        if grad_loss is None and grad_lse is None:
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
            grad_x = ops.ce_backward(g, h.to(acc), x3, target, weight, lse, *ctx.options)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            v = D.effective_logits(x3, *ctx.options[2:4])
        if ctx.needs_input_grad[1]:
            grad_t = D.target_grad(v, lse, weight, ctx.options[1], D.rows(g, x3)).to(target.dtype)
        if ctx.needs_input_grad[2]:  # the shard's classes, against the global lse
            terms = D.weight_terms(v, lse, target, ctx.options[1], ctx.options[-1])
            grad_w = D.weight_grad(terms, D.rows(g, x3)).to(weight.dtype)
        return (grad_x, grad_t, grad_w) + none


class InplaceVocabParallelFn(torch.autograd.Function):
    """In-place mode on a shard: the forward writes the gradient of the
    reduced loss (z-loss included) into the logits' storage, exactly, with
    the global lse, in row chunks; the backward only rescales it. Returns
    (loss, z_loss, lse, pred, target_pred); only `loss` is differentiable."""

    @staticmethod
    def forward(ctx, x3, target, weight, options, stats, group, offset, total, agreed, reduce):
        loss_rows, lse, A_rest, pred, target_pred, w_y_sum = _gather_rows(
            x3, target, weight, options, stats, group, offset, total, agreed)
        loss, z_loss, grad_scale, lse_grad_scale = reduce(loss_rows, lse, w_y_sum)
        acc = acc_dtype(x3.dtype)
        g = grad_scale.to(acc).expand(lse.shape)
        h = shard_grad_lse(g, A_rest, lse, lse_grad_scale, acc)
        inner = x3.shape[2] if x3.dim() == 3 else 1
        step = max(1, INPLACE_CHUNK // (x3.shape[1] * inner))
        for i in range(0, x3.shape[0], step):
            rows = slice(i * inner, (i + step) * inner)
            t = target[i:i + step] if target.is_floating_point() else target[rows]
            x3[i:i + step].copy_(ops.ce_backward(
                g[rows], h[rows], x3[i:i + step], t, weight, lse[rows], *options, offset, total))
        torch.autograd.graph.increment_version(x3)
        ctx.save_for_backward(x3)
        ctx.backward_done = False
        ctx.mark_non_differentiable(z_loss, lse, pred, target_pred)
        ctx.set_materialize_grads(False)
        return loss, z_loss, lse, pred, target_pred

    @staticmethod
    def backward(ctx, grad_loss, *_):
        _refuse_create_graph()
        return (scale_saved_grad_once(ctx, grad_loss),) + (None,) * 9


def reducer(reduction, weight, valid, count, z_loss_scale, acc, label_smoothing):
    """reduce(loss_rows, lse, w_y_sum) -> (loss, z_loss, the loss's gradient
    scale, the lse's gradient per unit lse), for the global rows; `count` is
    the number of rows not ignored, `valid` those rows (None: all)."""
    # A smoothed weighted mean over a zero weight sum is nan here: PyTorch's
    # whenever no row has weight, but not its infinity for weights that sum
    # to 0, which needs the nll part alone (another collective).
    zero_nll = weight is not None and valid is not None and label_smoothing

    def reduce(loss_rows, lse, w_y_sum):
        mean = reduction == "mean"
        den = (count if valid is None or weight is None else w_y_sum.to(acc)) if mean else None
        z_den = count if mean else None
        loss = reduce_rows(loss_rows, reduction, den, torch.zeros_like(den) if zero_nll and mean else None)
        grad_scale, lse_grad_scale = grad_scales(reduction, den, z_loss_scale, z_den, acc, loss.device)
        if not z_loss_scale:
            return loss, torch.zeros_like(loss), grad_scale, None
        z_loss = reduce_rows(z_loss_rows(lse, valid, z_loss_scale, acc), reduction, z_den)
        return loss + z_loss, z_loss, grad_scale, lse_grad_scale
    return reduce


def vocab_parallel_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                 inplace_backward, logit_scale, softcap, z_loss_scale, return_stats,
                                 process_group):
    """`cross_entropy(..., process_group=group)`: input holds this rank's
    contiguous slice of the classes, weight (if any) the same slice, a
    probability target the same slice; an index target holds global classes."""
    from .functional import _is_rows_view, _layout, finish, resolve_target  # functional imports this module

    check_common(input, weight)
    if input.dim() < 2:
        raise ValueError(
            f"vocab-parallel cross_entropy expects input of shape (N, C_local, ...), got {list(input.shape)}")
    group = _group(process_group)
    autocast = torch.is_autocast_enabled(input.device.type)
    acc = acc_dtype(input.dtype)
    n, n_classes, spatial = input.shape[0], input.shape[1], tuple(input.shape[2:])
    rows_view = _is_rows_view(input)
    x3 = _layout(input, rows_view)
    t, out_dtype, loss_shape, valid = resolve_target(input, target, weight, ignore_index, autocast, rows_view)
    inplace = inplace_backward and torch.is_grad_enabled() and input.requires_grad
    if inplace:
        check_inplace(input, t, weight)  # before any collective: every rank fails alike
    rows = n * math.prod(spatial)
    offset, total, agreed = shard_of(group, n_classes, rows, input.device)
    options = (ignore_index, label_smoothing, float(logit_scale), float(softcap or 0.0))
    count = torch.full((), rows, dtype=acc, device=input.device) if valid is None else valid.sum().to(acc)

    reduce = reducer(reduction, weight, valid, count, z_loss_scale, acc, label_smoothing)
    if inplace:
        loss, z_loss, lse, pred, target_pred = InplaceVocabParallelFn.apply(
            x3, t, weight, options, return_stats, group, offset, total, agreed, reduce)
    else:
        loss_rows, lse, pred, target_pred, w_y_sum = VocabParallelFn.apply(
            x3, t, weight, options, return_stats, group, offset, total, agreed)
        loss, z_loss = reduce(loss_rows, lse, w_y_sum)[:2]
    return finish(loss, z_loss, lse, reduction, loss_shape, out_dtype, return_stats, pred, target_pred, t,
                  valid, count)
