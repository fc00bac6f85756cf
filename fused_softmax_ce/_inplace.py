"""The in-place mode: the forward writes the gradient into the logits and the
backward only rescales it, so no N x C gradient buffer is ever allocated."""
import torch

from ._derivatives import acc_dtype
from ._ops import ops
from ._reduction import reduce_rows, z_loss_rows


def under_functorch(t):
    if torch.compiler.is_compiling():  # dynamo cannot trace these queries; it has no functorch wrappers
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.is_batchedtensor(t)


class InplaceFn(torch.autograd.Function):
    """Returns (loss, z_loss, lse, entropy, *the row statistics); only `loss`
    is differentiable. token_weight (per row, acc dtype) or None weighs each
    row's cross-entropy term, in the loss and in the gradient the kernel writes."""

    @staticmethod
    def forward(ctx, logits, target, weight, grad_scale, lse_grad_scale, options, stats, reduction,
                denominator, valid, z_denominator, nll_sum, token_weight):
        loss_rows, lse, entropy, *row_stats = ops.ce_forward_inplace(
            logits, target, weight, grad_scale, *options.op_args(), lse_grad_scale, stats, token_weight)
        if token_weight is not None:
            loss_rows = loss_rows * token_weight
        # Custom C++ ops do not bump the version counter; doing it here makes
        # autograd raise if anything saved the logits for its own backward.
        torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(logits)
        ctx.backward_done = False
        ctx.set_materialize_grads(False)
        loss = reduce_rows(loss_rows, reduction, denominator, nll_sum(lse))
        if options.z_loss_scale:
            z_loss = reduce_rows(z_loss_rows(lse, valid, options.z_loss_scale, loss_rows.dtype), reduction,
                                 z_denominator)
            loss = loss + z_loss
        else:
            z_loss = torch.zeros_like(loss)
        ctx.mark_non_differentiable(*row_stats)
        return loss, z_loss, lse, entropy, *row_stats

    @staticmethod
    def backward(ctx, grad_output, grad_z_loss, grad_lse, grad_entropy, *_):
        refuse_statistics_gradients(grad_z_loss, grad_lse, grad_entropy)
        if torch.is_grad_enabled():
            raise RuntimeError(
                "cross_entropy with inplace_backward=True does not support higher-order gradients "
                "(create_graph=True): its gradient is computed in the forward and is not itself "
                "differentiable; use inplace_backward=False"
            )
        return (scale_saved_grad_once(ctx, grad_output),) + (None,) * 12


def refuse_statistics_gradients(*grads):
    """The in-place mode's z_loss, lse and entropy (single-process and vocab
    parallel) stay differentiable outputs so that a gradient reaching them
    raises here, instead of their term being dropped silently."""
    for grad in grads:
        refuse_gradient(grad, "cross_entropy with inplace_backward=True computes the gradient of `loss` in "
                              "the forward; the z_loss, lse and entropy statistics are for logging and not "
                              "differentiable. Use inplace_backward=False to differentiate them")


def refuse_gradient(grad, message):
    """Raises `message` for a gradient that reaches an output not
    differentiable. Dynamo traces backwards with every gradient materialised
    (zeros where unused), so there the check is of the values, when it runs."""
    if grad is None:
        return
    if not torch.compiler.is_compiling():
        raise RuntimeError(message)
    torch._assert_async((grad == 0).all(), message)


def scale_saved_grad_once(ctx, grad_output):
    """The gradient the forward wrote into the logits' storage (saved on ctx),
    scaled there by grad_output; a second backward would scale it again, so it
    raises instead (ctx.backward_done starts False in the forward)."""
    if ctx.backward_done and not torch.compiler.is_compiling():  # dynamo may trace the backward twice
        raise RuntimeError(
            "Trying to backward through the graph a second time: cross_entropy with "
            "inplace_backward=True keeps one gradient buffer (the logits' storage) and "
            "scales it in place, so it can be used by one backward only"
        )
    ctx.backward_done = True
    (grad,) = ctx.saved_tensors
    if grad_output is not None:
        # One value broadcast over the rows (loss.sum() of reduction="none")
        # goes as that one value: scale_grad_ reads it with stride 0 (and
        # skips a 1) instead of a converted per-row copy.
        if grad_output.numel() > 1 and not any(grad_output.stride()):
            grad_output = grad_output[(0,) * grad_output.dim()]
        ops.scale_grad_(grad, grad_output.to(acc_dtype(grad.dtype)))
    if not torch.compiler.is_compiling():
        # The scaling writes the logits' storage: a node that saved the logits
        # after the forward (reading gradient values) raises if its backward
        # runs after this one. One whose backward ran before cannot be caught.
        torch.autograd.graph.increment_version(grad)
    return grad


def inplace_cross_entropy(*args):
    """InplaceFn.apply(logits, ...), refused under torch.func transforms."""
    if under_functorch(args[0]):
        raise RuntimeError(
            "cross_entropy with inplace_backward=True does not support torch.func transforms "
            "(grad, vmap, jacrev, jvp, ...); use inplace_backward=False"
        )
    return InplaceFn.apply(*args)
