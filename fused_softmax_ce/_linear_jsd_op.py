"""The custom op `fused_softmax_ce::linear_jsd`: linear_generalized_jsd's loss
and student gradients over chunks of rows, so that neither model's N x V
logits exist, and one op under torch.compile.

Each chunk's student and teacher logits come from one matmul each (into
buffers reused by every chunk); jsd_forward gives the chunk's row losses and
jsd_backward_ overwrites the student logits with grad_scale * dloss/dlogits,
which two matmuls turn into the chunk's share of the student's input,
weight and bias gradients. For 'sum' and 'batchmean' this happens in the
forward and the backward only scales; for 'none' the backward recomputes
the chunks with each row's grad_output.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensor

from ._chunks import Grads, cast, chunks, compute_dtype
from ._derivatives import acc_dtype
from ._jsd_ops import ops


@torch.library.custom_op("fused_softmax_ce::linear_jsd", mutates_args=())
def linear_jsd(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    labels: Optional[Tensor],
    student_bias: Optional[Tensor],
    teacher_bias: Optional[Tensor],
    grad_scale: Tensor,
    row_scale: Optional[Tensor],
    reduction: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    grad_acc_dtype: torch.dtype,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss (grad_scale * the sum of the row losses, or the rows for
    'none') and, where asked for, grad_scale * (row_scale *) dloss/d(student
    input, weight, bias); empty tensors stand for gradients not asked for.
    Inputs (N, H_s) and (N, H_t), weights (V, H_s) and (V, H_t), labels (N,)
    int64 or None, grad_scale one element of the accumulation dtype."""
    # The matmuls run in the dtype chosen here, not an enclosing autocast's.
    with torch.autocast(student_input.device.type, enabled=False):
        return _impl(student_input, student_weight, teacher_input, teacher_weight, labels, student_bias,
                     teacher_bias, grad_scale, row_scale, reduction, (beta, temperature, ignore_index), chunk_size,
                     grad_acc_dtype, (need_input_grad, need_weight_grad, need_bias_grad))


def _impl(si, sw, ti, tw, labels, sb, tb, grad_scale, row_scale, reduction, options, chunk_size, grad_acc_dtype,
          needs):
    cdt = compute_dtype(si.dtype, si.device)
    write_grad = any(needs)
    (w, b), (wt, bt) = cast(cdt, sw, sb), cast(cdt, tw, tb)
    loss = torch.empty(si.shape[0], dtype=acc_dtype(cdt), device=si.device)
    grads = Grads(si, sw, sb, cdt, chunk_size, grad_acc_dtype, *needs)
    for (start, stop, x, zs), (_, _, _, zt) in zip(chunks(si, w, b, cdt, chunk_size),
                                                   chunks(ti, wt, bt, cdt, chunk_size)):
        lab = None if labels is None else labels[start:stop]
        rows, stats = ops.jsd_forward(zs, zt, lab, *options)
        loss[start:stop] = rows
        if write_grad:
            g = grad_scale if row_scale is None else row_scale[start:stop]
            ops.jsd_backward_(zs, g, zt, lab, stats, *options)
            grads.add(zs, x, w, start, stop)
    out = loss if reduction == "none" else loss.sum() * grad_scale
    return (out, *grads.result())


@linear_jsd.register_fake
def _(si, sw, ti, tw, labels, sb, tb, grad_scale, row_scale, reduction, beta, temperature, ignore_index, chunk_size,
      grad_acc_dtype, need_input_grad, need_weight_grad, need_bias_grad):
    acc = acc_dtype(compute_dtype(si.dtype, si.device))
    return (si.new_empty(si.shape[0] if reduction == "none" else (), dtype=acc),
            torch.empty_like(si, memory_format=torch.contiguous_format) if need_input_grad else si.new_empty(0),
            torch.empty_like(sw, memory_format=torch.contiguous_format) if need_weight_grad else si.new_empty(0),
            torch.empty_like(sb) if need_bias_grad else si.new_empty(0))


def _setup_context(ctx, inputs, output):
    si, sw, ti, tw, labels, sb, tb, _scale, _row_scale, reduction, *options = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    if reduction == "none":
        # Each row has its own grad_output: the backward recomputes the chunks.
        ctx.save_for_backward(si, sw, ti, tw, labels, sb, tb)
        ctx.options = options[:4]  # beta, temperature, ignore_index, chunk_size
        ctx.grad_acc_dtype = options[4]
    else:
        ctx.save_for_backward(*output[1:])


def _scale(grad, needed, grad_loss):
    """grad * grad_loss: in place in eager mode; out of place where AOTAutograd
    traces (torch.compile, opcheck), which forbids mutating forward outputs."""
    if not needed:
        return None
    if isinstance(grad_loss, FunctionalTensor):
        return (grad * grad_loss).to(grad.dtype)
    # scale_grad_ is free when grad_loss is the scalar 1 (the usual backward).
    ops.scale_grad_(grad.view(1, -1) if grad.dim() == 1 else grad, grad_loss.to(acc_dtype(grad.dtype)))
    # A second backward through this graph would scale again: refused.
    torch.autograd.graph.increment_version(grad)
    return grad


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError("linear_generalized_jsd: double backward (create_graph=True) is not supported")
    need_input, need_weight = ctx.needs_input_grad[:2]
    need_bias = ctx.needs_input_grad[5]
    if grad_loss is None:
        return (None,) * 18
    if ctx.reduction == "none":
        si, sw, ti, tw, labels, sb, tb = ctx.saved_tensors
        ones = torch.ones((), dtype=grad_loss.dtype, device=grad_loss.device)
        _, gi, gw, gb = linear_jsd(si, sw, ti, tw, labels, sb, tb, ones, grad_loss.contiguous(), "none",
                                   *ctx.options, ctx.grad_acc_dtype, need_input, need_weight, need_bias)
    else:
        gi, gw, gb = (_scale(g, n, grad_loss) for g, n in zip(ctx.saved_tensors, (need_input, need_weight, need_bias)))
    return (gi if need_input else None, gw if need_weight else None, None, None, None,
            gb if need_bias else None) + (None,) * 12


linear_jsd.register_autograd(_backward, setup_context=_setup_context)
