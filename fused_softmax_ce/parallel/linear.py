"""Vocab-parallel `linear_cross_entropy`: the rows of linear_weight (the
vocabulary) sharded across the ranks of a torch.distributed process group.

Rank k holds the contiguous rows [offset_k, offset_k + V_k) of linear_weight
(and of linear_bias and the class weight), in rank order; input and target
(global class indices) are the same on every rank. Two passes over the same
chunks of rows, neither holding more than a chunk of the shard's logits:

- forward: each chunk's logits x W_k^T + b_k go through the kernel with the
  shard's class offset, which gives per row lse_k and L_k (and the stats);
  then one all_gather gives every rank the global loss and lse (see
  `shards.combine_shards`);
- backward: the chunk's logits again, the kernel's exact gradient of the
  shard with the global lse (grad_lse = g (A - A_k), as in cross_entropy.py),
  and the matmuls into grad W_k, grad b_k and this rank's term of grad input.

The gradient of input is sum_k dlogits_k W_k over the shards; each rank
returns its own term. That is Megatron-LM's convention for the
column-parallel output layer: the input reaches it through
copy_to_tensor_model_parallel_region (DTensor: a Replicate input whose
gradient comes back Partial), whose backward all-reduces the gradient.
Without such a region, all-reduce input's gradient over the group. The
gradient reaching the loss must be the same on every rank.

Collectives: the two per forward of shards.py (a 16-byte size check and the
16 N-byte all_gather), none in the backward; no host sync after the first
call per (group, shard size).
"""
import torch

from .._chunks import cast, chunks, compute_dtype, recomputed_grads
from .._finish import RowStats
from .._linear_entropy import LinearEntropy
from .._ops import acc_dtype, ops
from .shards import (combine_shards, group_of, reducer, refuse_create_graph, shard_grad_lse, shard_of, stat_columns,
                     target_values)


class VocabParallelLinearFn(torch.autograd.Function):
    """(loss, z_loss, lse, entropy, *the row statistics) of the global rows;
    only `loss` is differentiable. token_weight (per row) or None weighs each
    row's cross-entropy term."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, options, stats, chunk_size,
                grad_acc_dtype, group, shard, agreed, reduce, token_weight):
        n, device = input.shape[0], input.device
        cdt = compute_dtype(input.dtype, device)
        (w, b), cw = cast(cdt, linear_weight, linear_bias), weight  # the kernels read cw in float32
        loss_k = torch.empty(n, dtype=acc_dtype(cdt), device=device)
        lse_k = torch.empty(n, dtype=torch.float64, device=device)
        cols, v_y = [], []
        # The matmuls run in cdt as chosen here, not in an enclosing autocast's dtype.
        with torch.autocast(device.type, enabled=False):
            for start, stop, _x, logits in chunks(input, w, b, cdt, chunk_size):
                t = target[start:stop]
                loss_k[start:stop], lse_k[start:stop], entropy_k, *row_stats = ops.ce_forward(
                    logits, t, cw, *options.op_args(), stats, *shard)
                if stats:
                    cols.append(torch.stack(stat_columns(logits, t, lse_k[start:stop], entropy_k, row_stats,
                                                         options, shard)))
                if reduce.needs_nll:
                    v_y.append(target_values(logits, t, options, shard))
        # The per-row values come out of the all_gather; none pass through.
        no_stats = [torch.empty(0, dtype=torch.long, device=device) for _ in RowStats._fields]
        loss_rows, lse, entropy, A_rest, w_y_sum, nll_sum, row_stats = combine_shards(
            loss_k, lse_k, list(torch.cat(cols, 1)) if cols else [], no_stats, target, weight, options, group,
            shard, linear_weight.shape[0], agreed, torch.cat(v_y) if v_y else None, token_weight)
        if token_weight is not None:
            loss_rows = loss_rows * token_weight
        loss, z_loss, grad_scale, lse_grad_scale = reduce(loss_rows, lse, w_y_sum, nll_sum)
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse, A_rest, grad_scale,
                              lse_grad_scale, token_weight)
        ctx.options, ctx.shard, ctx.args = options, shard, (chunk_size, grad_acc_dtype)
        ctx.mark_non_differentiable(z_loss, lse, entropy, *row_stats)
        ctx.set_materialize_grads(False)
        return loss, z_loss, lse, entropy, *row_stats

    @staticmethod
    def backward(ctx, grad_loss, *_):
        refuse_create_graph()
        (input, linear_weight, linear_bias, target, weight, lse, A_rest, grad_scale,
         lse_grad_scale, token_weight) = ctx.saved_tensors
        chunk_size, grad_acc_dtype = ctx.args
        if weight is not None and ctx.needs_input_grad[4]:
            raise RuntimeError("the derivative for 'weight' is not implemented.")
        needs = ctx.needs_input_grad[:3]
        none = (None,) * 11
        if grad_loss is None or not any(needs):
            return (None,) * 3 + none
        cdt = compute_dtype(input.dtype, input.device)
        acc = acc_dtype(cdt)
        go = grad_loss.to(acc)  # a scalar, or per row for reduction 'none'
        g = (go * grad_scale).expand(lse.shape)
        g = (g if token_weight is None else g * token_weight).contiguous()
        h = shard_grad_lse(g, A_rest, lse, None if lse_grad_scale is None else go.double() * lse_grad_scale, acc)
        return recomputed_grads(input, linear_weight, linear_bias, target, weight, lse, ctx.options, ctx.shard,
                                chunk_size, grad_acc_dtype, needs, g, h) + none


def vocab_parallel_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, options,
                                        stats, chunk_size, grad_acc_dtype, valid, count, process_group,
                                        token_weight=None):
    """`linear_cross_entropy(..., process_group=group)` on checked (N, H)
    input, (N,) int64 target, `LossOptions` and per-row token weights or
    None: (loss, z_loss, lse, entropy, *the row statistics), reduced."""
    group = group_of(process_group)
    shard, agreed = shard_of(group, linear_weight.shape[0], input.shape[0], input.device)
    reduce = reducer(reduction, weight, valid, count, options, count.dtype)
    loss, z_loss, lse, entropy, *row_stats = VocabParallelLinearFn.apply(
        input, linear_weight, linear_bias, target, weight, options, bool(stats), int(chunk_size), grad_acc_dtype,
        group, shard, agreed, reduce, token_weight)
    if stats:
        entropy = LinearEntropy.apply(entropy, input, linear_weight, linear_bias, target, weight, lse, options, shard,
                                      int(chunk_size), grad_acc_dtype)
    return loss, z_loss, lse, entropy, *row_stats
