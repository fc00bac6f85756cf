"""`linear_cross_entropy`: the loss straight from hidden states, never holding the N x V logits.

Tokens are processed in chunks. Each chunk's logits come from one matmul; the
fused in-place kernel turns them into the per-row loss and overwrites them with
their gradient; two more matmuls turn that into the chunk's share of the
input, weight and bias gradients. For reduction 'mean' and 'sum' this happens
in the forward, so the backward only scales the gradients by grad_output; for
'none' every row has its own grad_output, so the backward recomputes the
chunks with the rows scaled.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.nn import _reduction as _Reduction

from ._checks import (check_class_weight_shape, check_index_weight_dtype, check_weight_not_differentiable,
                      dtype_name, label_smoothing_value, llm_option_values)
from ._inplace import _under_functorch, refuse_gradient
from ._ops import acc_dtype, ops
from ._derivatives import effective_logits
from ._reduction import grad_scales, mean_denominator, smoothed_nll_sum, target_logits
from .functional import cross_entropy, finish

_HALF = (torch.float16, torch.bfloat16)
_AUTOCAST_TO_LOW = (torch.float32,) + _HALF


def _compute_dtype(dtype, device):
    """The matmuls' dtype: the CPU emulates bf16/fp16 GEMMs (several times slower), so half runs in fp32 there."""
    return torch.float32 if dtype in _HALF and device.type == "cpu" else dtype


def default_chunk_size(n_rows, hidden, n_classes):
    """Rows per chunk whose logits take about as much memory as the input (N x H).

    Each chunk streams the whole weight and its gradient, so time grows with
    the number of chunks and memory with their size; this is PyTorch's own
    aspect-ratio rule (LinearCrossEntropyOptions), rounded up to a power of two.
    """
    rows = -(-n_rows // -(-n_classes // max(hidden, 1)))
    return max(1, min(n_rows, 1 << max(rows - 1, 0).bit_length()))


def _cast(dtype, *tensors):
    """The tensors in dtype; None stays None."""
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _chunk_loss(logits, target, weight, grad_scale, lse_grad_scale, options, stats, write_grad):
    """(loss, lse, pred) per row of one chunk of logits.

    With ``write_grad`` the logits are overwritten by grad_scale * dloss/dlogits
    (+ lse_grad_scale * lse * softmax, the z-loss). The single-process
    path's one call of the cross-entropy kernels (the vocab-parallel path,
    vocab_parallel_linear.py, calls them with its shard); options =
    (ignore_index, label_smoothing, logit_scale, softcap).
    """
    if write_grad:
        out = ops.ce_forward_inplace(logits, target, weight, grad_scale, *options, lse_grad_scale, stats)
    else:
        out = ops.ce_forward(logits, target, weight, *options, stats)
    return out[:3]


@torch.library.custom_op("fused_softmax_ce::linear_ce", mutates_args=())
def _linear_ce(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor],
    weight: Optional[Tensor],
    grad_scale: Tensor,
    row_scale: Optional[Tensor],
    reduction: str,
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss (reduced, or per row for 'none'; z-loss included) and, where asked
    for, the gradients grad_scale * (row_scale *) d loss / d (input,
    linear_weight, linear_bias) (empty tensors stand for gradients not asked
    for); then the z-loss term, the per-row lse (float64) and, with stats, the
    per-row argmax (else empty).

    input (N, H), linear_weight (V, H), target (N,) int64, linear_bias (V,);
    grad_scale is one element of the accumulation dtype, row_scale (N,) or None;
    lse_grad_scale is 2 * z_loss_scale (/ its mean's denominator), or None.
    """
    # The matmuls run in cdt as chosen here, not in an enclosing autocast's dtype.
    with torch.autocast(input.device.type, enabled=False):
        return _linear_ce_impl(input, linear_weight, target, linear_bias, weight, grad_scale, row_scale,
                               reduction, (ignore_index, label_smoothing, logit_scale, softcap),
                               lse_grad_scale, stats, chunk_size, grad_acc_dtype,
                               need_input_grad, need_weight_grad, need_bias_grad)


def chunks(input, w, b, cdt, chunk_size):
    """(start, stop, input rows in cdt, their logits input @ w.T + b) per
    chunk of rows; the logits live in one buffer reused by every chunk: no
    allocation, and no fresh pages to fault in, per chunk."""
    n = input.shape[0]
    rows = max(1, min(chunk_size, n))
    buf = torch.empty(rows, w.shape[0], dtype=cdt, device=input.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        x = input[start:stop].to(cdt)
        logits = buf[: stop - start]
        if b is None:
            torch.mm(x, w.t(), out=logits)
        else:
            torch.addmm(b, x, w.t(), out=logits)
        yield start, stop, x, logits


class Grads:
    """The gradients of input, linear_weight and linear_bias, summed over
    chunks from each chunk's dloss/dlogits; a fresh empty tensor stands for
    each not asked for (the op's outputs must not alias one another)."""

    def __init__(self, input, linear_weight, linear_bias, cdt, chunk_size, grad_acc_dtype, need_input,
                 need_weight, need_bias):
        n, h = input.shape
        v, device = linear_weight.shape[0], input.device
        self.needs = (need_input, need_weight, need_bias)
        self.dtypes = (input.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
        self.input = (torch.empty_like(input, memory_format=torch.contiguous_format) if need_input
                      else input.new_empty(0))
        self.weight = torch.zeros(v, h, dtype=grad_acc_dtype, device=device) if need_weight else input.new_empty(0)
        self.bias = torch.zeros(v, dtype=grad_acc_dtype, device=device) if need_bias else input.new_empty(0)
        # A grad-input buffer, reused by every chunk, when it needs a cast.
        rows = max(1, min(chunk_size, n))
        self.cast_buf = torch.empty(rows, h, dtype=cdt, device=device) if need_input and cdt != input.dtype else None

    def add(self, g, x, w, start, stop):
        """Adds the chunk's share for its dloss/dlogits g, input rows x and weight w (both in g's dtype)."""
        need_input, need_weight, need_bias = self.needs
        if need_input:
            if self.cast_buf is None:
                torch.mm(g, w, out=self.input[start:stop])
            else:
                self.input[start:stop] = torch.mm(g, w, out=self.cast_buf[: stop - start])
        if need_weight:
            if self.weight.dtype == g.dtype:
                self.weight.addmm_(g.t(), x)
            else:
                self.weight += g.t() @ x
        if need_bias:
            self.bias += g.sum(0, dtype=self.bias.dtype)

    def result(self):
        """(input, weight, bias) gradients in their tensors' dtypes."""
        self.cast_buf = None
        return tuple(grad.to(dtype) if needed else grad
                     for grad, dtype, needed in zip((self.input, self.weight, self.bias), self.dtypes, self.needs))


def _linear_ce_impl(input, linear_weight, target, linear_bias, weight, grad_scale, row_scale,
                    reduction, options, lse_grad_scale, stats, chunk_size, grad_acc_dtype,
                    need_input_grad, need_weight_grad, need_bias_grad):
    n = input.shape[0]
    dtype, device = input.dtype, input.device
    cdt = _compute_dtype(dtype, device)
    acc = acc_dtype(cdt)
    write_grad = need_input_grad or need_weight_grad or need_bias_grad

    # The kernels read the class weight in float32 (float64 for float64), as
    # PyTorch under autocast: not rounded to the matmuls' dtype.
    (w, b), cw = _cast(cdt, linear_weight, linear_bias), weight
    loss = torch.empty(n, dtype=acc, device=device)
    lse = torch.empty(n, dtype=torch.float64, device=device)
    pred = torch.empty(n if stats else 0, dtype=torch.long, device=device)
    grads = Grads(input, linear_weight, linear_bias, cdt, chunk_size, grad_acc_dtype,
                  need_input_grad, need_weight_grad, need_bias_grad)
    ignore_index, label_smoothing, logit_scale, softcap = options
    valid = target != ignore_index
    # A smoothed weighted mean needs its nll part alone where the weights sum to 0 (see reduce_rows).
    v_y = lse.new_empty(n) if reduction == "mean" and weight is not None and label_smoothing else None

    for start, stop, x, logits in chunks(input, w, b, cdt, chunk_size):
        if v_y is not None:  # before the kernel overwrites the logits
            v_y[start:stop] = target_logits(logits, target[start:stop], valid[start:stop],
                                            lambda v: effective_logits(v, logit_scale, softcap))
        chunk = _chunk_loss(logits, target[start:stop], cw, grad_scale, lse_grad_scale, options, stats,
                            write_grad)
        loss[start:stop], lse[start:stop] = chunk[0], chunk[1]
        if stats:
            pred[start:stop] = chunk[2]
        if not write_grad:
            continue
        if row_scale is not None:
            ops.scale_grad_(logits, row_scale[start:stop])
        grads.add(logits, x, w, start, stop)
    del w
    grad_input, grad_w, grad_b = grads.result()

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
            nll = smoothed_nll_sum(v_y, lse, target, weight, valid, label_smoothing).to(acc)
            out = torch.where(grad_scale.isinf(), nll * grad_scale + (total - nll) * grad_scale, out)
    return out + z_loss, grad_input, grad_w, grad_b, z_loss, lse, pred


@_linear_ce.register_fake
def _(input, linear_weight, target, linear_bias, weight, grad_scale, row_scale, reduction,
      ignore_index, label_smoothing, logit_scale, softcap, lse_grad_scale, stats, chunk_size,
      grad_acc_dtype, need_input_grad, need_weight_grad, need_bias_grad):
    acc = acc_dtype(_compute_dtype(input.dtype, input.device))
    n = input.shape[0]
    out = input.new_empty(n if reduction == "none" else (), dtype=acc)
    return (out,
            torch.empty_like(input, memory_format=torch.contiguous_format) if need_input_grad else input.new_empty(0),
            torch.empty_like(linear_weight, memory_format=torch.contiguous_format) if need_weight_grad
            else input.new_empty(0),
            torch.empty_like(linear_bias) if need_bias_grad else input.new_empty(0),
            torch.empty_like(out),
            input.new_empty(n, dtype=torch.float64),
            input.new_empty(n if stats else 0, dtype=torch.long))


def _setup_context(ctx, inputs, output):
    (input, linear_weight, target, linear_bias, weight, _grad_scale, _row_scale, reduction,
     ignore_index, label_smoothing, logit_scale, softcap, lse_grad_scale, _stats, chunk_size,
     grad_acc_dtype, *_needs) = inputs
    # The gradient outputs get no gradient: no V x H zeros made for them in
    # the backward; nor do the statistics (see _StatisticOnly).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    if reduction == "none":
        # Each row has its own grad_output: the backward recomputes the chunks.
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, lse_grad_scale)
        ctx.args = (ignore_index, label_smoothing, logit_scale, softcap, chunk_size, grad_acc_dtype)
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
        input, linear_weight, target, linear_bias, weight, lse_grad_scale = ctx.saved_tensors
        ignore_index, label_smoothing, logit_scale, softcap, chunk_size, grad_acc_dtype = ctx.args
        ones = torch.ones((), dtype=grad_loss.dtype, device=grad_loss.device)
        _, gi, gw, gb, *_ = _linear_ce(
            input, linear_weight, target, linear_bias, weight, ones, grad_loss.contiguous(), "none",
            ignore_index, label_smoothing, logit_scale, softcap, lse_grad_scale, False, chunk_size,
            grad_acc_dtype, need_input, need_weight, need_bias,
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
            gb if need_bias else None) + (None,) * 15


_linear_ce.register_autograd(_backward, setup_context=_setup_context)


class _StatisticOnly(torch.autograd.Function):
    """A statistic whose gradient was not computed: using it in a loss raises
    instead of silently dropping its term. It requires grad through `anchor`
    (the loss), not through requires_grad_(), which torch.compile cannot
    trace on an intermediate."""

    @staticmethod
    def forward(ctx, t, anchor):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        refuse_gradient(grad, "linear_cross_entropy computes the gradient of `loss` in the forward; its z_loss "
                              "and lse statistics are for logging and not differentiable")
        return None, None


def _check(input, linear_weight, target, linear_bias, weight, autocast):
    """PyTorch's checks (types and messages) for what this path supports; clear refusals for the rest."""
    if input.dim() < 1:
        raise RuntimeError(f"expected input with dimensionality 1 or more, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(
            f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}"
        )
    if linear_weight.dim() > 2:
        raise NotImplementedError(
            "linear_cross_entropy: K-dimensional loss (linear_weight of shape "
            f"{tuple(linear_weight.shape)}) is not supported; expected linear_weight of shape (V, H)"
        )
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    n_classes = linear_weight.shape[0]
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes,):
        raise RuntimeError(f"expected linear_bias shape {(n_classes,)}, got {tuple(linear_bias.shape)}")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(
                f"linear_cross_entropy: {name} dtype {t.dtype} must match input dtype {input.dtype}"
            )
    if input.dtype not in (torch.float32, torch.float64) + _HALF:
        raise NotImplementedError(
            f"linear_cross_entropy: input dtype {input.dtype} is not supported; expected one of "
            "float32, float64, float16, bfloat16"
        )
    if target.is_floating_point():
        raise NotImplementedError(
            f"linear_cross_entropy: probability targets (a {target.dtype} target of shape "
            f"{tuple(target.shape)}) are not supported; expected int64 class indices of shape "
            f"{tuple(input.shape[:-1])}"
        )
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"Expected input batch_size ({tuple(input.shape[:-1])}) to match target batch_size "
            f"({tuple(target.shape)})."
        )
    if target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got {dtype_name(target.dtype)}"
        )
    if weight is not None:
        check_class_weight_shape(weight, n_classes)
        check_index_weight_dtype(input, weight, autocast)
        check_weight_not_differentiable(weight)


def linear_cross_entropy(
    input,
    linear_weight,
    target,
    *,
    linear_bias=None,
    weight=None,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    chunk_size=None,
    grad_acc_dtype=None,
    logit_scale=1.0,
    softcap=None,
    z_loss_scale=0.0,
    return_stats=False,
    process_group=None,
):
    """Same arguments and results as `torch.nn.functional.linear_cross_entropy`,
    ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)``,
    without ever holding the N x V logits.

    ``input`` is (H) or (..., H) and ``target`` the matching (...) class
    indices; ``linear_weight`` is (V, H) and ``linear_bias`` (V).

    ``chunk_size``: rows of ``input`` per chunk; the default gives a chunk's
    logits about the input's size (see `default_chunk_size`). ``grad_acc_dtype``: the dtype in
    which the gradients of ``linear_weight`` and ``linear_bias`` are summed
    over chunks; default float32 for float16/bfloat16 weights (the result is
    rounded once, at the end), else the weight's dtype. Pass the weight's
    own dtype to sum in it: less accurate, and V x H x 4 bytes less where
    the matmuls run in that dtype (not on the CPU, which multiplies half
    precision in fp32).

    ``logit_scale``, ``softcap``, ``z_loss_scale`` and ``return_stats`` are
    `cross_entropy`'s; with ``return_stats`` the result is a
    `CrossEntropyStats` whose ``z_loss`` and ``lse`` are not differentiable
    here (the gradients are computed in the forward).

    ``process_group``: vocab parallel. ``linear_weight`` (and ``linear_bias``,
    and ``weight``) hold this rank's contiguous slice of the vocabulary rows,
    in rank order; ``input``, ``target`` (global class indices) and the
    options are the same on every rank. Every rank gets the loss of the full
    weight and the gradients of its own slices; the gradient of ``input`` is
    this rank's term of the sum over the shards (Megatron's convention: the
    region that copies ``input`` to the ranks all-reduces it; without one,
    all-reduce ``input.grad`` yourself). See
    `fused_softmax_ce.vocab_parallel_linear`.
    """
    _Reduction.get_enum(reduction)  # ValueError on an unknown reduction, as PyTorch
    if ignore_index is None:  # PyTorch's default for class-index targets
        ignore_index = -100
    label_smoothing = label_smoothing_value(label_smoothing)
    logit_scale, softcap, z_loss_scale = llm_option_values(logit_scale, softcap, z_loss_scale)
    autocast = torch.is_autocast_enabled(input.device.type)
    out_dtype = input.dtype
    if autocast:
        # As autocast runs the reference: the linear in the autocast dtype
        # (float64 stays), the cross-entropy in float32.
        dt = torch.get_autocast_dtype(input.device.type)
        input, linear_weight, linear_bias = (
            None if t is None or t.dtype not in _AUTOCAST_TO_LOW else t.to(dt)
            for t in (input, linear_weight, linear_bias))
        out_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    _check(input, linear_weight, target, linear_bias, weight, autocast)
    if _needs_composite(input, linear_weight, linear_bias):
        return _composite(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                          label_smoothing, logit_scale, softcap, z_loss_scale, return_stats, process_group)
    if grad_acc_dtype is None:
        grad_acc_dtype = torch.float32 if input.dtype in _HALF else input.dtype

    loss_shape = tuple(target.shape)
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1).long()
    n, v = x.shape[0], linear_weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(n, x.shape[1], v)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")

    acc = acc_dtype(_compute_dtype(x.dtype, x.device))
    valid = t != ignore_index
    count = valid.sum().to(acc)
    grad_on = torch.is_grad_enabled()
    if process_group is not None:
        from .vocab_parallel_linear import vocab_parallel_linear_cross_entropy  # it imports this module
        loss, z_loss, lse, pred = vocab_parallel_linear_cross_entropy(
            x, linear_weight, t, linear_bias, weight, reduction, ignore_index, label_smoothing, logit_scale,
            softcap, z_loss_scale, return_stats, chunk_size, grad_acc_dtype, valid, count, process_group)
    else:
        denominator = mean_denominator(t, weight, ignore_index, v, acc) if reduction == "mean" else None
        scale, lse_grad_scale = grad_scales(reduction, denominator, z_loss_scale, count, acc, x.device)
        need = [grad_on and reduction != "none" and p is not None and p.requires_grad
                for p in (x, linear_weight, linear_bias)]
        loss, _, _, _, z_loss, lse, pred = _linear_ce(
            x, linear_weight, t, linear_bias, weight, scale, None, reduction, ignore_index,
            label_smoothing, logit_scale, softcap, lse_grad_scale,
            bool(return_stats), int(chunk_size), grad_acc_dtype, *need)
    out = finish(loss, z_loss, lse, reduction, loss_shape, out_dtype, return_stats, pred, None, t, valid, count)
    differentiable = grad_on and any(p is not None and p.requires_grad for p in (x, linear_weight, linear_bias))
    if return_stats and differentiable:
        out = out._replace(z_loss=_StatisticOnly.apply(out.z_loss, out.loss),
                           lse=_StatisticOnly.apply(out.lse, out.loss))
    return out


def _needs_composite(*tensors):
    """True under torch.func transforms or with forward-mode tangents: the
    fused op computes its gradients in the forward, which these cannot see."""
    if torch.compiler.is_compiling():
        return False
    return any(t is not None and (_under_functorch(t) or forward_ad.unpack_dual(t).tangent is not None)
               for t in tensors)


def _composite(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
               logit_scale, softcap, z_loss_scale, return_stats, process_group):
    """linear then cross_entropy, with the N x V logits held: what torch.func
    and forward-mode AD differentiate (the logits' ops support them)."""
    if process_group is not None:
        raise RuntimeError(
            "linear_cross_entropy with process_group does not support torch.func transforms or "
            "forward-mode AD; all-gather the logits and use cross_entropy instead"
        )
    logits = nn.functional.linear(input, linear_weight, linear_bias)
    out = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), weight=weight,
                        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                        logit_scale=logit_scale, softcap=softcap or None, z_loss_scale=z_loss_scale,
                        return_stats=return_stats)
    if reduction != "none":
        return out
    if return_stats:
        return out._replace(loss=out.loss.reshape(target.shape), z_loss=out.z_loss.reshape(target.shape),
                            lse=out.lse.reshape(target.shape))
    return out.reshape(target.shape)


class LinearCrossEntropyLoss(nn.Module):
    """A module for `linear_cross_entropy`: the constructor takes its keyword options
    (weight, reduction, ignore_index, label_smoothing, chunk_size, grad_acc_dtype, and
    keyword-only logit_scale, softcap, z_loss_scale, return_stats, process_group);
    ``weight`` is a buffer, so ``.to()`` and ``state_dict`` carry it.
    """

    def __init__(self, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                 chunk_size=None, grad_acc_dtype=None, *, logit_scale=1.0, softcap=None,
                 z_loss_scale=0.0, return_stats=False, process_group=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size
        self.grad_acc_dtype = grad_acc_dtype
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.z_loss_scale = z_loss_scale
        self.return_stats = return_stats
        self.process_group = process_group

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, chunk_size=self.chunk_size,
            grad_acc_dtype=self.grad_acc_dtype, logit_scale=self.logit_scale, softcap=self.softcap,
            z_loss_scale=self.z_loss_scale, return_stats=self.return_stats,
            process_group=self.process_group,
        )

    def extra_repr(self):
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size}")
