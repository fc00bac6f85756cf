"""The custom op `fused_softmax_ce::linear_ce`: linear_cross_entropy's
single-process loss and gradients over chunks (see linear.py for the scheme),
with its fake kernel and autograd."""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensor

from ._chunks import Grads, cast, chunks, compute_dtype
from ._ops import acc_dtype, ops
from ._reduction import smoothed_nll_sum, target_logits
from .options import LossOptions


def _chunk_loss(logits, target, weight, grad_scale, lse_grad_scale, options, stats, write_grad, token_weight):
    """(loss, lse, entropy, *the row statistics) per row of one chunk of logits.

    With ``write_grad`` the logits are overwritten by grad_scale *
    (token_weight *) dloss/dlogits (+ lse_grad_scale * lse * softmax, the
    z-loss). The single-process
    path's one call of the cross-entropy kernels (the vocab-parallel path,
    parallel/linear.py, calls them with its shard).
    """
    if write_grad:
        out = ops.ce_forward_inplace(logits, target, weight, grad_scale, *options.op_args(), lse_grad_scale, stats,
                                     token_weight)
    else:
        out = ops.ce_forward(logits, target, weight, *options.op_args(), stats)
    return out


@torch.library.custom_op("fused_softmax_ce::linear_ce", mutates_args=())
def linear_ce(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor],
    weight: Optional[Tensor],
    grad_scale: Tensor,
    row_scale: Optional[Tensor],
    token_weight: Optional[Tensor],
    reduction: str,
    # The ops' options (LossOptions.op_args), as every op takes them.
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    lse_grad_scale: Optional[Tensor],
    stats: bool,
    chunk_size: int,
    grad_acc_dtype: torch.dtype,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss (reduced, or per row for 'none'; z-loss included) and, where asked
    for, the gradients grad_scale * (row_scale *) d loss / d (input,
    linear_weight, linear_bias) (empty tensors stand for gradients not asked
    for); then the z-loss term, the per-row lse (float64), and the entropy
    and row statistics as the ce ops return them: with stats the per-row
    entropy and argmax (else empty), and an empty probability-target argmax.

    input (N, H), linear_weight (V, H), target (N,) int64, linear_bias (V,);
    grad_scale is one element of the accumulation dtype, row_scale (N,) or
    None, token_weight (N,) or None (each row's cross-entropy term's weight);
    lse_grad_scale is 2 * z_loss_scale (/ its mean's denominator), or None.
    """
    # The matmuls run in cdt as chosen here, not in an enclosing autocast's dtype.
    with torch.autocast(input.device.type, enabled=False):
        return _linear_ce_impl(input, linear_weight, target, linear_bias, weight, grad_scale, row_scale,
                               token_weight, reduction, LossOptions(ignore_index, label_smoothing, logit_scale, softcap),
                               lse_grad_scale, stats, chunk_size, grad_acc_dtype,
                               need_input_grad, need_weight_grad, need_bias_grad)


def _linear_ce_impl(input, linear_weight, target, linear_bias, weight, grad_scale, row_scale, token_weight,
                    reduction, options, lse_grad_scale, stats, chunk_size, grad_acc_dtype,
                    need_input_grad, need_weight_grad, need_bias_grad):
    n = input.shape[0]
    dtype, device = input.dtype, input.device
    cdt = compute_dtype(dtype, device)
    acc = acc_dtype(cdt)
    write_grad = need_input_grad or need_weight_grad or need_bias_grad

    # The kernels read the class weight in float32 (float64 for float64), as
    # PyTorch under autocast: not rounded to the matmuls' dtype.
    (w, b), cw = cast(cdt, linear_weight, linear_bias), weight
    loss = torch.empty(n, dtype=acc, device=device)
    lse = torch.empty(n, dtype=torch.float64, device=device)
    entropy = torch.empty(n if stats else 0, dtype=acc, device=device)
    pred = torch.empty(n if stats else 0, dtype=torch.long, device=device)
    grads = Grads(input, linear_weight, linear_bias, cdt, chunk_size, grad_acc_dtype,
                  need_input_grad, need_weight_grad, need_bias_grad)
    valid = target != options.ignore_index
    # A smoothed weighted mean needs its nll part alone where the weights sum to 0 (see reduce_rows).
    v_y = lse.new_empty(n) if reduction == "mean" and weight is not None and options.label_smoothing else None

    for start, stop, x, logits in chunks(input, w, b, cdt, chunk_size):
        if v_y is not None:  # before the kernel overwrites the logits
            v_y[start:stop] = target_logits(logits, target[start:stop], valid[start:stop], options)
        tw = None if token_weight is None else token_weight[start:stop]
        chunk = _chunk_loss(logits, target[start:stop], cw, grad_scale, lse_grad_scale, options, stats,
                            write_grad, tw)
        loss[start:stop], lse[start:stop] = chunk[0], chunk[1]
        if stats:
            entropy[start:stop], pred[start:stop] = chunk[2], chunk[3]
        if not write_grad:
            continue
        if row_scale is not None:
            ops.scale_grad_(logits, row_scale[start:stop])
        grads.add(logits, x, w, start, stop)
    del w
    grad_input, grad_w, grad_b = grads.result()
    if token_weight is not None:
        loss = loss * token_weight

    # lse_grad_scale / 2 is z_loss_scale over the z-loss's own denominator
    # (ignored rows have lse 0).
    z_rows = (0.5 * lse_grad_scale * lse.to(acc) ** 2) if lse_grad_scale is not None else torch.zeros_like(loss)
    if reduction == "none":
        out, z_loss = loss, z_rows
    elif reduction == "sum":
        out, z_loss = loss.sum(), z_rows.sum()
    else:
        total = loss.sum()
        out, z_loss = total * grad_scale, z_rows.sum()
        if v_y is not None:  # grad_scale is 1 / sum(w_y): inf where that is 0
            nll = smoothed_nll_sum(v_y, lse, target, weight, valid, options.label_smoothing, token_weight).to(acc)
            out = torch.where(grad_scale.isinf(), nll * grad_scale + (total - nll) * grad_scale, out)
    # The row statistics as the ce ops return them: no probability target here.
    return out + z_loss, grad_input, grad_w, grad_b, z_loss, lse, entropy, pred, pred.new_empty(0)


@linear_ce.register_fake
def _(input, linear_weight, target, linear_bias, weight, grad_scale, row_scale, token_weight, reduction, *args):
    _, (_lse_grad_scale, stats, _chunk_size, _grad_acc_dtype, need_input_grad, need_weight_grad,
        need_bias_grad) = LossOptions.split_op_args(args)
    acc = acc_dtype(compute_dtype(input.dtype, input.device))
    n = input.shape[0]
    out = input.new_empty(n if reduction == "none" else (), dtype=acc)
    return (out,
            torch.empty_like(input, memory_format=torch.contiguous_format) if need_input_grad else input.new_empty(0),
            torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if need_weight_grad
            else input.new_empty(0),
            torch.empty_like(linear_bias) if need_bias_grad else input.new_empty(0),
            torch.empty_like(out),
            input.new_empty(n, dtype=torch.float64),
            input.new_empty(n if stats else 0, dtype=acc),
            input.new_empty(n if stats else 0, dtype=torch.long),
            input.new_empty(0, dtype=torch.long))


def _setup_context(ctx, inputs, output):
    input, linear_weight, target, linear_bias, weight, _grad_scale, _row_scale, token_weight, reduction, *args = inputs
    options, (lse_grad_scale, _stats, chunk_size, grad_acc_dtype, *_needs) = LossOptions.split_op_args(args)
    # The gradient outputs get no gradient: no V x H zeros made for them in
    # the backward; nor do the statistics (see _StatisticOnly).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    if reduction == "none":
        # Each row has its own grad_output: the backward recomputes the chunks.
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, lse_grad_scale, token_weight)
        ctx.options, ctx.args = options, (chunk_size, grad_acc_dtype)
    else:
        # The gradients were computed by the forward; the backward scales them in place.
        ctx.save_for_backward(*output[1:4])


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "linear_cross_entropy: double backward (create_graph=True) is not supported; "
            "use the reference path, torch.nn.functional.linear_cross_entropy(..., options=None)"
        )
    need_input, need_weight, _, need_bias = ctx.needs_input_grad[:4]
    if ctx.reduction == "none":
        input, linear_weight, target, linear_bias, weight, lse_grad_scale, token_weight = ctx.saved_tensors
        chunk_size, grad_acc_dtype = ctx.args
        ones = torch.ones((), dtype=grad_loss.dtype, device=grad_loss.device)
        _, gi, gw, gb, *_ = linear_ce(
            input, linear_weight, target, linear_bias, weight, ones, grad_loss.contiguous(), token_weight, "none",
            *ctx.options.op_args(), lse_grad_scale, False, chunk_size, grad_acc_dtype, need_input, need_weight,
            need_bias,
        )
    else:
        gi, gw, gb = ctx.saved_tensors
        if isinstance(grad_loss, FunctionalTensor):
            # Traced by AOTAutograd (torch.compile, opcheck): a backward may not
            # mutate the forward's outputs there, so the scaling is out of place.
            gi, gw, gb = ((g * grad_loss).to(g.dtype) for g in (gi, gw, gb))
        else:
            for grad, needed in ((gi, need_input), (gw, need_weight), (gb, need_bias)):
                if needed:  # free when grad_output is the scalar 1
                    ops.scale_grad_(grad.view(1, -1) if grad.dim() == 1 else grad,
                                    grad_loss.to(acc_dtype(grad.dtype)))
                    # A second backward through this graph would scale again:
                    # bumping the version makes autograd refuse it.
                    torch.autograd.graph.increment_version(grad)
    return (gi if need_input else None, gw if need_weight else None, None,
            gb if need_bias else None) + (None,) * 16


linear_ce.register_autograd(_backward, setup_context=_setup_context)
