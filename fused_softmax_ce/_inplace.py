"""The in-place mode: the forward writes the gradient into the logits and the
backward only rescales it, so no N x C gradient buffer is ever allocated."""
import torch

from ._ops import ops


def _under_functorch(t):
    if torch.compiler.is_compiling():  # dynamo cannot trace these queries; it has no functorch wrappers
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.is_batchedtensor(t)


class InplaceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, grad_scale, ignore_index, label_smoothing, reduction):
        loss = ops.ce_forward_inplace(logits, target, weight, grad_scale, ignore_index, label_smoothing)
        # Custom C++ ops do not bump the version counter; doing it here makes
        # autograd raise if anything saved the logits for its own backward.
        torch.autograd.graph.increment_version(logits)
        ctx.save_for_backward(logits)
        ctx.backward_done = False
        if reduction == "none":
            return loss
        return loss.sum() * grad_scale if reduction == "mean" else loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "cross_entropy with inplace_backward=True does not support higher-order gradients "
                "(create_graph=True): its gradient is computed in the forward and is not itself "
                "differentiable; use inplace_backward=False"
            )
        if ctx.backward_done:
            # The gradient was scaled in place by the first backward.
            raise RuntimeError(
                "Trying to backward through the graph a second time: cross_entropy with "
                "inplace_backward=True keeps one gradient buffer (the logits' storage) and "
                "scales it in place, so it can be used by one backward only"
            )
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        ops.scale_grad_(grad, grad_output)
        return grad, None, None, None, None, None, None


def inplace_cross_entropy(logits, target, weight, grad_scale, ignore_index, label_smoothing, reduction):
    if _under_functorch(logits):
        raise RuntimeError(
            "cross_entropy with inplace_backward=True does not support torch.func transforms "
            "(grad, vmap, jacrev, jvp, ...); use inplace_backward=False"
        )
    return InplaceFn.apply(logits, target, weight, grad_scale, ignore_index, label_smoothing, reduction)
