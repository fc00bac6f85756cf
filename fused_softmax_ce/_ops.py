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

ops = torch.ops.fused_softmax_ce


def _rows(logits):
    return logits.shape[0] * (logits.shape[2] if logits.dim() == 3 else 1)


@torch.library.register_fake("fused_softmax_ce::ce_forward")
def _ce_forward_fake(logits, target, weight, ignore_index, label_smoothing):
    rows = _rows(logits)
    return logits.new_empty(rows, dtype=acc_dtype(logits.dtype)), logits.new_empty(rows, dtype=torch.float64)


@torch.library.register_fake("fused_softmax_ce::ce_backward")
def _ce_backward_fake(grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("fused_softmax_ce::ce_forward_inplace")
def _ce_forward_inplace_fake(logits, target, weight, grad_scale, ignore_index, label_smoothing):
    return logits.new_empty(_rows(logits), dtype=acc_dtype(logits.dtype))


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
def _ce_forward_vmap(info, in_dims, logits, target, weight, ignore_index, label_smoothing):
    if in_dims[2] is not None:
        return _loop(lambda x, t, w: ops.ce_forward(x, t, w, ignore_index, label_smoothing),
                     info, in_dims[:3], (logits, target, weight))
    B = info.batch_size
    loss, lse = ops.ce_forward(_fold(logits, in_dims[0], B), _fold(target, in_dims[1], B), weight,
                               ignore_index, label_smoothing)
    return (_unfold(loss, B), _unfold(lse, B)), (0, 0)


@torch.library.register_vmap("fused_softmax_ce::ce_backward")
def _ce_backward_vmap(info, in_dims, grad_loss, grad_lse, logits, target, weight, lse, ignore_index,
                      label_smoothing):
    args = (grad_loss, grad_lse, logits, target, weight, lse)
    if in_dims[4] is not None:
        return _loop(lambda *a: ops.ce_backward(*a, ignore_index, label_smoothing), info, in_dims[:6], args)
    B = info.batch_size
    folded = [None if a is None else _fold(a, d, B) for a, d in zip(args, in_dims)]
    folded[4] = weight
    return _unfold(ops.ce_backward(*folded, ignore_index, label_smoothing), B), 0


# --------------------------------------------------------------- autograd

def _forward_setup(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing = inputs
    ctx.save_for_backward(logits, target, weight, output[1])
    ctx.save_for_forward(logits, target, weight, output[1])
    ctx.ignore_index = ignore_index
    ctx.label_smoothing = label_smoothing
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, grad_loss, grad_lse, backward_op):
    """Gradients of ce_forward's (loss, lse) for the logits and soft targets."""
    logits, target, weight, lse = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError("the derivative for 'weight' is not implemented.")
    if grad_loss is None and grad_lse is None:
        return None, None, None, None, None
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse, dtype=acc_dtype(logits.dtype))
    grad_logits = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_logits = backward_op(grad_loss, grad_lse, logits, target, weight, lse, ctx.ignore_index,
                                  ctx.label_smoothing)
    if ctx.needs_input_grad[1]:
        g = D.rows(grad_loss, logits)
        grad_target = D.target_grad(logits, lse, weight, ctx.label_smoothing, g).to(target.dtype)
    return grad_logits, grad_target, None, None, None


def _backward_setup(ctx, inputs, output):
    grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing = inputs
    ctx.save_for_backward(grad_loss, grad_lse, logits, target, weight, lse)
    ctx.save_for_forward(grad_loss, grad_lse, logits, target, weight, lse)
    ctx.ignore_index = ignore_index
    ctx.label_smoothing = label_smoothing
    ctx.set_materialize_grads(False)


def _saved_terms(ctx):
    grad_loss, grad_lse, logits, target, weight, lse = ctx.saved_tensors
    terms = D.row_terms(logits, target, weight, lse, ctx.ignore_index, ctx.label_smoothing)
    g = D.rows(grad_loss, logits).to(terms.A.dtype)
    h = torch.zeros_like(g) if grad_lse is None else D.rows(grad_lse, logits).to(terms.A.dtype)
    return grad_loss, grad_lse, logits, target, weight, lse, terms, g, h


def _backward_backward(ctx, grad_grad):
    """Double backward: the derivatives of ce_backward's output (dloss/dz)."""
    if grad_grad is None:
        return (None,) * 8
    grad_loss, grad_lse, logits, target, weight, lse, terms, g, h = _saved_terms(ctx)
    if ctx.needs_input_grad[4]:
        raise RuntimeError("the derivative for 'weight' is not implemented.")
    is_prob = target.is_floating_point()
    gg, gh, gz, glse, gt = D.backward_vjp(terms, g, h, weight, ctx.label_smoothing, is_prob,
                                          grad_grad.to(terms.A.dtype))
    needs = ctx.needs_input_grad
    return (
        D.flat(gg).to(grad_loss.dtype) if needs[0] else None,
        D.flat(gh).to(grad_lse.dtype) if needs[1] and grad_lse is not None else None,
        gz.to(logits.dtype) if needs[2] else None,
        gt.to(target.dtype) if needs[3] and is_prob else None,
        None,
        D.flat(glse).to(lse.dtype) if needs[5] else None,
        None,
        None,
    )


torch.library.register_autograd(
    "fused_softmax_ce::ce_forward",
    lambda ctx, gl, gs: _forward_backward(ctx, gl, gs, ops.ce_backward),
    setup_context=_forward_setup,
)
torch.library.register_autograd(
    "fused_softmax_ce::ce_backward", _backward_backward, setup_context=_backward_setup
)


class ForwardFn(torch.autograd.Function):
    """ce_forward for eager mode: torch.func and forward-mode AD as well."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, ignore_index, label_smoothing):
        return ops.ce_forward(logits, target, weight, ignore_index, label_smoothing)

    setup_context = staticmethod(_forward_setup)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        return _forward_backward(ctx, grad_loss, grad_lse, BackwardFn.apply)

    @staticmethod
    def jvp(ctx, d_logits, d_target, d_weight, *_):
        if d_weight is not None:
            raise RuntimeError("the derivative for 'weight' is not implemented.")
        logits, target, weight, lse = ctx.saved_tensors
        acc = acc_dtype(logits.dtype)
        ones = torch.ones_like(lse, dtype=acc)
        d_loss = torch.zeros_like(lse, dtype=acc)
        d_lse = torch.zeros_like(lse)
        args = (logits, target, weight, lse, ctx.ignore_index, ctx.label_smoothing)
        if d_logits is not None:
            grad = BackwardFn.apply(ones, None, *args).to(acc)
            p = BackwardFn.apply(torch.zeros_like(ones), ones, *args).to(acc)
            d_loss = d_loss + D.flat((grad * d_logits.to(acc)).sum(1, keepdim=True))
            d_lse = d_lse + D.flat((p * d_logits.to(acc)).sum(1, keepdim=True)).double()
        if d_target is not None and target.is_floating_point():
            dt = D.target_grad(logits, lse, weight, ctx.label_smoothing, D.rows(ones, logits))
            d_loss = d_loss + D.flat((dt * d_target.double()).sum(1, keepdim=True)).to(acc)
        return d_loss, d_lse


class BackwardFn(torch.autograd.Function):
    """ce_backward for eager mode, differentiable in both directions."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing):
        return ops.ce_backward(grad_loss, grad_lse, logits, target, weight, lse, ignore_index,
                               label_smoothing)

    setup_context = staticmethod(_backward_setup)
    backward = staticmethod(_backward_backward)

    @staticmethod
    def jvp(ctx, d_grad_loss, d_grad_lse, d_logits, d_target, d_weight, d_lse, *_):
        if d_weight is not None:
            raise RuntimeError("the derivative for 'weight' is not implemented.")
        grad_loss, grad_lse, logits, target, weight, lse, terms, g, h = _saved_terms(ctx)

        def per_row(d):
            return torch.zeros_like(g) if d is None else D.rows(d, logits).to(g.dtype)

        dz = torch.zeros_like(terms.p) if d_logits is None else d_logits.to(terms.p.dtype)
        dt = None if d_target is None or not target.is_floating_point() else d_target.to(g.dtype)
        out = D.backward_jvp(terms, g, h, weight, ctx.label_smoothing, target.is_floating_point(),
                             per_row(d_grad_loss), per_row(d_grad_lse), dz, per_row(d_lse), dt)
        return out.to(logits.dtype)


def cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing):
    """(loss, lse) per row, differentiable; the op itself under torch.compile."""
    if torch.compiler.is_compiling():
        return ops.ce_forward(logits, target, weight, ignore_index, label_smoothing)
    return ForwardFn.apply(logits, target, weight, ignore_index, label_smoothing)
