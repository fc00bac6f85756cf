"""Loads the compiled ops and registers their fake kernels, vmap rules and autograd.

Autograd comes in two forms that share one set of formulas:
- `torch.library.register_autograd` on the ops themselves, which is what
  torch.compile traces (it keeps the graph whole);
- the autograd.Functions `ForwardFn` and `BackwardFn`, used in eager mode,
  which also support torch.func (grad, vmap, jacrev, jvp, hessian) and
  forward-mode AD, which generated op autograd cannot.
The backward op is itself differentiable, so double backward works in both.
"""
import torch

from . import _C  # noqa: F401  (importing it registers torch.ops.fused_softmax_ce)
from . import _derivatives as D
from ._derivatives import acc_dtype
from .options import LossOptions, Shard

ops = torch.ops.fused_softmax_ce


def cpu_isa():
    """The CPU kernels that launches run now: "avx512-bf16", "avx512", "avx2"
    or "baseline". The widest this CPU runs, unless the environment variable
    FSCE_CPU_ISA names another it runs (read at every launch)."""
    return ops.cpu_isa()


def _rows(logits):
    return logits.shape[0] * (logits.shape[2] if logits.dim() == 3 else 1)


def _forward_outputs(logits, target, stats):
    rows = _rows(logits)
    return (
        logits.new_empty(rows, dtype=acc_dtype(logits.dtype)),
        logits.new_empty(rows, dtype=torch.float64),
        logits.new_empty(rows if stats else 0, dtype=acc_dtype(logits.dtype)),
        logits.new_empty(rows if stats else 0, dtype=torch.long),
        logits.new_empty(rows if stats and target.is_floating_point() else 0, dtype=torch.long),
    )


def _stats_flag(args, kwargs, position):
    """The ops' `stats` argument: `position` in what follows their options
    (the flat arguments after their tensors), or its keyword, else False."""
    _, rest = LossOptions.split_op_args(args)
    return rest[position] if len(rest) > position else kwargs.get("stats", False)


@torch.library.register_fake("fused_softmax_ce::ce_forward")
def _ce_forward_fake(logits, target, weight, *args, **kwargs):
    return _forward_outputs(logits, target, _stats_flag(args, kwargs, 0))


def _blocks_contiguous(x):
    """binding.cpp's blocks_contiguous: each n's [C, S] block is contiguous."""
    if x.dim() == 2:
        return x.shape[1] <= 1 or x.stride(1) == 1
    return (x.shape[2] <= 1 or x.stride(2) == 1) and (x.shape[1] <= 1 or x.stride(1) == x.shape[2])


@torch.library.register_fake("fused_softmax_ce::ce_backward")
def _ce_backward_fake(grad_output, grad_lse, logits, target, weight, lse, *_args, **_kwargs):
    # binding.cpp's gradient_like, on the logits in block layout (a contiguous
    # copy when they are not): for row-padded logits, the outer stride and the
    # storage offset are theirs modulo 16 bytes.
    n, inner = logits.shape[0], logits.shape[2] if logits.dim() == 3 else 1
    block = logits.shape[1] * inner
    in_place = _blocks_contiguous(logits)
    phase = 16 // logits.element_size()
    padded = in_place and n > 1 and block > 0 and logits.stride(0) > block
    outer = block + (logits.stride(0) - block) % phase if padded else block
    offset = logits.storage_offset() % phase if in_place else 0
    strides = (outer, inner, 1) if logits.dim() == 3 else (outer, 1)
    return logits.new_empty(offset + n * outer).as_strided(logits.shape, strides, offset)


@torch.library.register_fake("fused_softmax_ce::ce_forward_inplace")
def _ce_forward_inplace_fake(logits, target, weight, grad_scale, *args, **kwargs):
    return _forward_outputs(logits, target, _stats_flag(args, kwargs, 1))  # after lse_grad_scale


@torch.library.register_fake("fused_softmax_ce::scale_grad_")
def _scale_grad_fake(grad, grad_output):
    return None


# ------------------------------------------------------------------- vmap
# A vmapped batch of row problems is one bigger row problem: the batch
# dimension folds into N, so the fused kernels run once.

def _fold(x, in_dim, batch_size):
    """x with its batch dimension first and merged into the next one."""
    x = x.movedim(in_dim, 0) if in_dim is not None else x.expand((batch_size,) + x.shape)
    return x.reshape((-1,) + tuple(x.shape[2:]))


def _unfold(x, batch_size):
    return x.reshape((batch_size, -1) + tuple(x.shape[1:]))


def _loop(op, info, in_dims, args):
    """Per-sample fallback for a batched class weight (rare)."""
    outs = []
    for b in range(info.batch_size):
        outs.append(op(*[a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)]))
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


@torch.library.register_vmap("fused_softmax_ce::ce_forward")
def _ce_forward_vmap(info, in_dims, logits, target, weight, *options):
    if in_dims[2] is not None:
        return _loop(lambda x, t, w: ops.ce_forward(x, t, w, *options), info, in_dims[:3], (logits, target, weight))
    B = info.batch_size
    outs = ops.ce_forward(_fold(logits, in_dims[0], B), _fold(target, in_dims[1], B), weight, *options)
    # Empty outputs (the argmaxes without stats) stay empty per sample.
    return tuple(_unfold(o, B) if o.numel() else o.new_empty(B, 0) for o in outs), (0,) * len(outs)


@torch.library.register_vmap("fused_softmax_ce::ce_backward")
def _ce_backward_vmap(info, in_dims, *args):
    # Every argument is folded, the entropy's pair among the options included,
    # except the class weight (shared by every row).
    if in_dims[4] is not None:
        return _loop(ops.ce_backward, info, in_dims, args)
    B = info.batch_size
    folded = [a if i == 4 or not torch.is_tensor(a) else _fold(a, d, B)
              for i, (a, d) in enumerate(zip(args, in_dims))]
    return _unfold(ops.ce_backward(*folded), B), 0


# --------------------------------------------------------------- autograd

def _forward_setup(ctx, inputs, output):
    logits, target, weight, *args = inputs
    ctx.save_for_backward(logits, target, weight, output[1], output[2])
    ctx.save_for_forward(logits, target, weight, output[1], output[2])
    ctx.options, (stats, *shard) = LossOptions.split_op_args(args)
    ctx.shard = Shard(*shard)
    ctx.stats = stats  # without it the entropy is empty: a gradient for it (aot's zeros) is dropped
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[3:])  # the argmax statistics
    ctx.set_materialize_grads(False)


def _backward_args(ctx, grad_entropy=None, entropy=None):
    """What ce_backward takes after its tensors, for the forward saved on
    ctx (with the entropy's upstream gradient and value, or None)."""
    return (*ctx.options.op_args(), grad_entropy, entropy if grad_entropy is not None else None, *ctx.shard)


def _forward_backward(ctx, grad_output, grad_lse, grad_entropy, backward_op):
    """Gradients of ce_forward's (loss, lse, entropy) for the logits, and for
    probability targets the target's and the class weight's (the entropy
    depends on neither)."""
    logits, target, weight, lse, entropy = ctx.saved_tensors
    if not ctx.stats:
        grad_entropy = None
    none = (None,) * (ctx.num_inputs - 3)
    if ctx.needs_input_grad[2] and not target.is_floating_point():
        raise RuntimeError("the derivative for 'weight' is not implemented.")
    if grad_output is None and grad_lse is None and grad_entropy is None:
        return (None, None, None) + none
    if grad_output is None:
        grad_output = torch.zeros_like(lse, dtype=acc_dtype(logits.dtype))
    grad_logits = grad_target = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_logits = backward_op(grad_output, grad_lse, logits, target, weight, lse,
                                  *_backward_args(ctx, grad_entropy, entropy))
    g = D.rows(grad_output, logits)
    eps = ctx.options.label_smoothing
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        v = D.effective_logits(logits, ctx.options)
    if ctx.needs_input_grad[1]:
        grad_target = D.target_grad(v, lse, weight, eps, g).to(target.dtype)
    if ctx.needs_input_grad[2]:
        terms = D.weight_terms(v, lse, target, eps, ctx.shard.n_classes(logits))
        grad_weight = D.weight_grad(terms, g).to(weight.dtype)
    return (grad_logits, grad_target, grad_weight) + none


def _backward_setup(ctx, inputs, output):
    grad_output, grad_lse, logits, target, weight, lse, *args = inputs
    ctx.save_for_backward(grad_output, grad_lse, logits, target, weight, lse)
    ctx.save_for_forward(grad_output, grad_lse, logits, target, weight, lse)
    ctx.options, (grad_entropy, _entropy, *shard) = LossOptions.split_op_args(args)
    ctx.with_entropy = grad_entropy is not None
    ctx.shard = Shard(*shard)
    ctx.num_inputs = len(inputs)
    ctx.set_materialize_grads(False)


def _saved_terms(ctx):
    options = ctx.options
    if options.transforms_logits or ctx.shard.class_offset != 0 or ctx.with_entropy:
        raise RuntimeError(
            "fused_softmax_ce: second-order derivatives (double backward, forward-mode AD of the "
            "gradient, hessian) are implemented for the plain loss only, not with logit_scale, "
            "softcap, a vocab-parallel shard or through the entropy "
            f"(got logit_scale={options.logit_scale}, softcap={options.softcap})"
        )
    grad_output, grad_lse, logits, target, weight, lse = ctx.saved_tensors
    terms = D.row_terms(logits, target, weight, lse, options.ignore_index, options.label_smoothing)
    g = D.rows(grad_output, logits).to(terms.A.dtype)
    h = torch.zeros_like(g) if grad_lse is None else D.rows(grad_lse, logits).to(terms.A.dtype)
    return grad_output, grad_lse, logits, target, weight, lse, terms, g, h


def _backward_backward(ctx, grad_grad):
    """Double backward: the derivatives of ce_backward's output (dloss/dz)."""
    none = (None,) * (ctx.num_inputs - 6)
    if grad_grad is None:
        return (None,) * 6 + none
    grad_output, grad_lse, logits, target, weight, lse, terms, g, h = _saved_terms(ctx)
    if ctx.needs_input_grad[4]:
        raise RuntimeError("the derivative for 'weight' is not implemented.")
    is_prob = target.is_floating_point()
    gg, gh, gz, glse, gt = D.backward_vjp(terms, g, h, weight, ctx.options.label_smoothing, is_prob,
                                          grad_grad.to(terms.A.dtype))
    needs = ctx.needs_input_grad
    return (
        D.flat(gg).to(grad_output.dtype) if needs[0] else None,
        D.flat(gh).to(grad_lse.dtype) if needs[1] and grad_lse is not None else None,
        gz.to(logits.dtype) if needs[2] else None,
        gt.to(target.dtype) if needs[3] and is_prob else None,
        None,
        D.flat(glse).to(lse.dtype) if needs[5] else None,
    ) + none


torch.library.register_autograd(
    "fused_softmax_ce::ce_forward",
    lambda ctx, g, g_lse, g_entropy, *_: _forward_backward(ctx, g, g_lse, g_entropy, ops.ce_backward),
    setup_context=_forward_setup,
)
torch.library.register_autograd(
    "fused_softmax_ce::ce_backward", _backward_backward, setup_context=_backward_setup
)


class ForwardFn(torch.autograd.Function):
    """ce_forward for eager mode: torch.func and forward-mode AD as well."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, *options):
        return ops.ce_forward(logits, target, weight, *options)

    setup_context = staticmethod(_forward_setup)

    @staticmethod
    def backward(ctx, grad_output, grad_lse, grad_entropy, *_):
        return _forward_backward(ctx, grad_output, grad_lse, grad_entropy, BackwardFn.apply)

    @staticmethod
    def jvp(ctx, d_logits, d_target, d_weight, *_):
        logits, target, weight, lse, entropy = ctx.saved_tensors
        if d_weight is not None and not target.is_floating_point():
            raise RuntimeError("the derivative for 'weight' is not implemented.")
        acc = acc_dtype(logits.dtype)
        ones = torch.ones_like(lse, dtype=acc)
        d_loss = torch.zeros_like(lse, dtype=acc)
        d_lse = torch.zeros_like(lse)
        d_entropy = torch.zeros_like(entropy)
        args = (logits, target, weight, lse)
        if d_logits is not None:
            # The kernels' own first derivatives: of the loss (g = 1), of the
            # lse (h = 1) and of the entropy, transform included.
            zeros = torch.zeros_like(ones)
            grad = BackwardFn.apply(ones, None, *args, *_backward_args(ctx)).to(acc)
            dlse = BackwardFn.apply(zeros, ones, *args, *_backward_args(ctx)).to(acc)
            d_loss = d_loss + D.flat((grad * d_logits.to(acc)).sum(1, keepdim=True))
            d_lse = d_lse + D.flat((dlse * d_logits.to(acc)).sum(1, keepdim=True)).double()
            if entropy.numel():
                dent = BackwardFn.apply(zeros, None, *args, *_backward_args(ctx, ones, entropy)).to(acc)
                d_entropy = d_entropy + D.flat((dent * d_logits.to(acc)).sum(1, keepdim=True))
        eps = ctx.options.label_smoothing
        if (d_target is not None and target.is_floating_point()) or d_weight is not None:
            v = D.effective_logits(logits, ctx.options)
        if d_target is not None and target.is_floating_point():
            dt = D.target_grad(v, lse, weight, eps, D.rows(ones, logits))
            d_loss = d_loss + D.flat((dt * d_target.double()).sum(1, keepdim=True)).to(acc)
        if d_weight is not None:
            terms = D.weight_terms(v, lse, target, eps, ctx.shard.n_classes(logits))
            dw = d_weight.double().reshape(D.class_shape(logits))
            d_loss = d_loss + D.flat((terms * dw).sum(1, keepdim=True)).to(acc)
        return d_loss, d_lse, d_entropy, None, None


class BackwardFn(torch.autograd.Function):
    """ce_backward for eager mode, differentiable in both directions."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, grad_lse, logits, target, weight, lse, *options):
        return ops.ce_backward(grad_output, grad_lse, logits, target, weight, lse, *options)

    setup_context = staticmethod(_backward_setup)
    backward = staticmethod(_backward_backward)

    @staticmethod
    def jvp(ctx, d_grad_output, d_grad_lse, d_logits, d_target, d_weight, d_lse, *_):
        if d_weight is not None:
            raise RuntimeError("the derivative for 'weight' is not implemented.")
        grad_output, grad_lse, logits, target, weight, lse, terms, g, h = _saved_terms(ctx)

        def per_row(d):
            return torch.zeros_like(g) if d is None else D.rows(d, logits).to(g.dtype)

        dz = torch.zeros_like(terms.p) if d_logits is None else d_logits.to(terms.p.dtype)
        dt = None if d_target is None or not target.is_floating_point() else d_target.to(g.dtype)
        out = D.backward_jvp(terms, g, h, weight, ctx.options.label_smoothing, target.is_floating_point(),
                             per_row(d_grad_output), per_row(d_grad_lse), dz, per_row(d_lse), dt)
        return out.to(logits.dtype)


def cross_entropy_rows(logits, target, weight, options, stats):
    """(loss, lse, entropy, *the row statistics) per row, the first three
    differentiable (the entropy empty without stats), for a
    `LossOptions`; the op itself under torch.compile."""
    if torch.compiler.is_compiling():
        return ops.ce_forward(logits, target, weight, *options.op_args(), stats)
    return ForwardFn.apply(logits, target, weight, *options.op_args(), stats, *Shard())
