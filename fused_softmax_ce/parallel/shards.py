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
rank (24 R for float64 logits); +24 R with stats, +16 R more with stats and
probability targets, +8 with class weights. None in the backward.

This module holds what both vocab-parallel paths share: the shard
agreement, the all_gather that combines the shards' rows, the backward's
grad_lse and the reduction. cross_entropy.py runs the kernels on the shard's
logits, linear.py on chunks of them.
"""
import torch
import torch.distributed as dist

from .. import _derivatives as D
from .._finish import RowStats
from .._reduction import grad_scales, reduce_rows, z_loss_rows
from ..options import Shard

_SHARDS = {}  # (group, local classes) -> (class_offset, total_classes, sizes of all ranks)

def group_of(process_group):
    return dist.group.WORLD if process_group is None else process_group


def shard_of(group, n_classes, rows, device):
    """(this rank's `Shard`, agreed); agreed is a device
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
    return Shard(offset, total), (every[:, 0] == classes).all()


def _shard_coefficient(target, weight, options, shard, n_classes):
    """A_k per row (float64): this shard's part of A = coef_y + k sum_a, and
    for class-index targets this shard's w_y (0 when y is elsewhere)."""
    eps, offset, total = options.label_smoothing, shard.class_offset, shard.total_classes
    sum_w = float(n_classes) if weight is None else weight.double().sum()
    if target.is_floating_point():
        t = target.double()
        ta = t.sum(1) if weight is None else (t * weight.double().reshape(D.class_shape(t))).sum(1)
        return (1 - eps) * ta.reshape(-1) + (eps / total) * sum_w, None
    valid = target != options.ignore_index
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
    return D.effective_logits(x3.gather(1, idx), options).reshape(-1).double()


def target_values(x3, target, options, shard):
    """The effective logit at each row's class-index target where this shard
    holds it (float64), 0 elsewhere: read before an in-place kernel writes."""
    local = target.reshape(-1) - shard.class_offset
    here = (local >= 0) & (local < x3.shape[1])
    if x3.shape[1] == 0:
        return torch.zeros(local.shape, dtype=torch.float64, device=x3.device)
    return torch.where(here, _value_at(x3, torch.where(here, local, 0), options), 0.0)


def stat_columns(x3, target, lse_k, entropy_k, row_stats, options, shard):
    """The per-row values the stats gather (float64), from the shard's lse,
    entropy and `RowStats`: the mean effective logit under the shard's own
    softmax (lse_k - entropy_k), its max effective logit and its argmax, and
    for probability targets the target's."""
    offset = shard.class_offset
    pred, target_pred = RowStats(*row_stats)
    mean_k = torch.where(lse_k.isneginf(), 0.0, lse_k - entropy_k.double())  # a shard of no classes adds nothing
    cols = [mean_k, _value_at(x3, pred - offset, options), pred.double()]
    if target.is_floating_point():
        t_max = target.gather(1, (target_pred - offset).reshape(D.row_shape(x3))).reshape(-1)
        cols += [t_max.double(), target_pred.double()]
    return cols


def combine_shards(loss_k, lse_k, cols, row_stats, target, weight, options, group, shard, n_classes, agreed,
                   v_y=None, token_weight=None):
    """The all_gather of the shard's per-row (lse_k, L_k, A_k) and stat
    columns: (loss_rows, lse, entropy, A - A_k, sum of w_y or None, the
    smoothed loss's nll part or None, `RowStats`), all global (the entropy in
    the loss's dtype, empty without stats); the row statistics pass through
    without stats. With v_y (`target_values`), the rows' w_y and w_y v_y
    (times their token weights) travel too, for the nll part (1 - eps) sum
    w_y (lse - v_y) that PyTorch's smoothed mean divides apart (see
    `reduce_rows`)."""
    pred, target_pred = RowStats(*row_stats)
    A_k, w_y = _shard_coefficient(target, weight, options, shard, n_classes)
    # (L_k, A_k) travel in the accumulation type, the kernels' own precision:
    # for float32 the pair is one float64 slot. lse_k and the stats are float64.
    pair = torch.stack([loss_k, A_k.to(loss_k.dtype)], 1).view(torch.float64).reshape(-1)
    rows = lse_k.numel()
    extra = [w_y.sum().reshape(1)] if w_y is not None and weight is not None else []
    w_nll = w_y if token_weight is None or v_y is None else w_y * token_weight.double()
    nll_cols = [w_nll, w_nll * v_y] if v_y is not None else []
    payload = torch.cat([lse_k, pair] + cols + nll_cols + extra + [agreed.double().reshape(1)])
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
    start = rows + pair.numel()
    per_row = every[:, start:start + len(cols) * rows].reshape(world, len(cols), rows)
    start += len(cols) * rows
    nll_rows = every[:, start:start + len(nll_cols) * rows].reshape(world, len(nll_cols), rows).sum(0)
    lse = torch.logsumexp(lse_all, 0)
    if not target.is_floating_point():
        lse = torch.where(target != options.ignore_index, lse, 0.0)  # the kernels' 0 for ignored rows
    # A shard whose A_k is 0 adds nothing, also where its lse_k is -inf.
    shift = torch.where(A_all != 0, A_all * (lse - lse_all), 0.0)
    loss = (loss_all.sum(0) + shift.sum(0)).to(loss_k.dtype)
    A_rest = A_all.sum(0) - A_all[dist.get_rank(group)]
    entropy = loss_k.new_empty(0)
    if cols:
        # H = lse - sum_k exp(lse_k - lse) E_k[v], E_k the shard's mean effective logit.
        entropy = lse - (torch.exp(lse_all - lse) * per_row[:, 0]).sum(0)
        if not target.is_floating_point():
            entropy = torch.where(target != options.ignore_index, entropy, 0.0)
        entropy = entropy.to(loss_k.dtype)
        pred = _first_max(per_row[:, 1], per_row[:, 2]).long()
        if target.is_floating_point():
            target_pred = _first_max(per_row[:, 3], per_row[:, 4]).long()
    w_y_sum = every[:, -1].sum() if extra else None
    nll_sum = (1 - options.label_smoothing) * (nll_rows[0] * lse - nll_rows[1]).sum() if nll_cols else None
    return loss, lse, entropy, A_rest, w_y_sum, nll_sum, RowStats(pred, target_pred)


def shard_grad_lse(g, A_rest, lse, lse_grad, acc):
    """The backward kernel's grad_lse for a shard: the other shards' part of
    g A, so that the kernel's gradient coefficient is the whole row's, plus
    the z-loss's lse_grad * lse (lse_grad per unit lse, or None; the lse is 0
    on ignored rows)."""
    h = g.double() * A_rest
    if lse_grad is not None:
        h = h + lse_grad * lse
    return h.to(acc)


def refuse_create_graph():
    # The gradient is computed by the kernel, not by differentiable ops: a
    # second-order term through it would silently be zero.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "cross_entropy and linear_cross_entropy with process_group do not support higher-order "
            "gradients (create_graph=True); their gradient is not itself differentiable"
        )


def reducer(reduction, weight, valid, count, options, acc):
    """reduce(loss_rows, lse, w_y_sum) -> (loss, z_loss, the loss's gradient
    scale, the lse's gradient per unit lse), for the global rows; `count` is
    the number of rows not ignored, `valid` those rows (None: all)."""
    # A smoothed weighted mean over a zero weight sum divides its nll and
    # smoothing parts apart, as PyTorch: the nll part comes from
    # combine_shards (reduce.needs_nll: pass it target_values).
    z_loss_scale = options.z_loss_scale

    def reduce(loss_rows, lse, w_y_sum, nll_sum=None):
        mean = reduction == "mean"
        den = (count if valid is None or weight is None else w_y_sum.to(acc)) if mean else None
        z_den = count if mean else None
        loss = reduce_rows(loss_rows, reduction, den, nll_sum.to(acc) if reduce.needs_nll else None)
        grad_scale, lse_grad_scale = grad_scales(reduction, den, z_loss_scale, z_den, acc, loss.device)
        if not z_loss_scale:
            return loss, torch.zeros_like(loss), grad_scale, None
        z_loss = reduce_rows(z_loss_rows(lse, valid, z_loss_scale, acc), reduction, z_den)
        return loss + z_loss, z_loss, grad_scale, lse_grad_scale

    reduce.needs_nll = bool(reduction == "mean" and weight is not None and valid is not None
                            and options.label_smoothing)
    return reduce


