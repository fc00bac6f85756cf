"""`linear_cross_entropy`: the loss straight from hidden states, never holding the N x V logits.

Tokens are processed in chunks. Each chunk's logits come from one matmul; the
fused in-place kernel turns them into the per-row loss and overwrites them with
their gradient; two more matmuls turn that into the chunk's share of the
input, weight and bias gradients. For reduction 'mean' and 'sum' this happens
in the forward, so the backward only scales the gradients by grad_output; for
'none' every row has its own grad_output, so the backward recomputes the
chunks with the rows scaled.
"""
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn import _reduction as _Reduction

from ._checks import (check_class_weight_shape, check_index_weight_dtype, check_weight_not_differentiable, dtype_name,
                      token_weight_rows)
from ._chunks import HALF, compute_dtype, default_chunk_size
from ._derivatives import acc_dtype
from ._finish import finish
from ._inplace import refuse_gradient, under_functorch
from ._linear_entropy import LinearEntropy
from ._linear_op import linear_ce
from ._reduction import grad_scales, mean_denominator
from .functional import cross_entropy
from .options import LossOptions
from .parallel.linear import vocab_parallel_linear_cross_entropy

_AUTOCAST_TO_LOW = (torch.float32,) + HALF

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
    if input.dtype not in (torch.float32, torch.float64) + HALF:
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
    token_weight=None,
    process_group=None,
):
    """Same arguments and results as `torch.nn.functional.linear_cross_entropy`,
    ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)``,
    without ever holding the N x V logits.

    ``input`` is (H) or (..., H) and ``target`` the matching (...) class
    indices; ``linear_weight`` is (V, H) and ``linear_bias`` (V).

    ``chunk_size``: rows of ``input`` per chunk; the default gives a chunk's
    logits 2 to 64 MiB, and at least 64 rows (see `default_chunk_size`). ``grad_acc_dtype``: the dtype in
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
    `fused_softmax_ce.parallel.linear`.
    """
    _Reduction.get_enum(reduction)  # ValueError on an unknown reduction, as PyTorch
    if ignore_index is None:  # PyTorch's default for class-index targets
        ignore_index = -100
    options = LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing, logit_scale=logit_scale,
                          softcap=softcap, z_loss_scale=z_loss_scale).checked()
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
        return _composite(input, linear_weight, target, linear_bias, weight, reduction, options, return_stats,
                          process_group, token_weight)
    if grad_acc_dtype is None:
        grad_acc_dtype = torch.float32 if input.dtype in HALF else input.dtype

    loss_shape = tuple(target.shape)
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1).long()
    n, v = x.shape[0], linear_weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(n, x.shape[1], v, compute_dtype(x.dtype, x.device).itemsize,
                                        x.device.type)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")

    acc = acc_dtype(compute_dtype(x.dtype, x.device))
    tw = token_weight_rows(token_weight, loss_shape, x.device, acc)
    valid = t != options.ignore_index
    count = valid.sum().to(acc)
    grad_on = torch.is_grad_enabled()
    if process_group is not None:
        loss, z_loss, lse, entropy, *row_stats = vocab_parallel_linear_cross_entropy(
            x, linear_weight, t, linear_bias, weight, reduction, options, return_stats, chunk_size, grad_acc_dtype,
            valid, count, process_group, tw)
    else:
        denominator = mean_denominator(t, weight, options.ignore_index, v, acc) if reduction == "mean" else None
        scale, lse_grad_scale = grad_scales(reduction, denominator, options.z_loss_scale, count, acc, x.device)
        need = [grad_on and reduction != "none" and p is not None and p.requires_grad
                for p in (x, linear_weight, linear_bias)]
        loss, _, _, _, z_loss, lse, entropy, *row_stats = linear_ce(
            x, linear_weight, t, linear_bias, weight, scale, None, tw, reduction, *options.op_args(), lse_grad_scale,
            bool(return_stats), int(chunk_size), grad_acc_dtype, *need)
        if return_stats:
            entropy = LinearEntropy.apply(entropy, x, linear_weight, linear_bias, t, weight, lse, options, (),
                                          int(chunk_size), grad_acc_dtype)
    out = finish(loss, z_loss, lse, entropy, row_stats, reduction, loss_shape, out_dtype, return_stats, t, valid,
                 count)
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
    return any(t is not None and (under_functorch(t) or forward_ad.unpack_dual(t).tangent is not None)
               for t in tensors)


def _composite(input, linear_weight, target, linear_bias, weight, reduction, options, return_stats,
               process_group, token_weight):
    """linear then cross_entropy, with the N x V logits held: what torch.func
    and forward-mode AD differentiate (the logits' ops support them)."""
    if process_group is not None:
        raise RuntimeError(
            "linear_cross_entropy with process_group does not support torch.func transforms or "
            "forward-mode AD; all-gather the logits and use cross_entropy instead"
        )
    logits = nn.functional.linear(input, linear_weight, linear_bias)
    out = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), weight=weight,
                        reduction=reduction, return_stats=return_stats, **options.as_kwargs(),
                        token_weight=None if token_weight is None else token_weight.reshape(-1))
    if reduction != "none":
        return out
    if return_stats:
        return out._replace(loss=out.loss.reshape(target.shape), z_loss=out.z_loss.reshape(target.shape),
                            lse=out.lse.reshape(target.shape), entropy=out.entropy.reshape(target.shape))
    return out.reshape(target.shape)
