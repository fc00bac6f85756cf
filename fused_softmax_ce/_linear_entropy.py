"""linear_cross_entropy's entropy statistic, made differentiable.

The loss's gradients are made in the forward, before anyone knows whether
the entropy will get a gradient. So the entropy's backward recomputes each
chunk's logits (one matmul per chunk, paid only when the entropy is used in
a loss) and runs the backward kernel with the entropy's term alone:
dH/dv_j = -p_j (log p_j + H), from the forward's lse and H. Vocab parallel
passes its shard, and each rank's input gradient is its term, as the loss's.
"""
import torch
from torch.autograd.function import once_differentiable

from ._chunks import recomputed_grads


class LinearEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entropy, input, linear_weight, linear_bias, target, weight, lse, options, shard, chunk_size,
                grad_acc_dtype):
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse, entropy)
        ctx.args = (options, shard, chunk_size, grad_acc_dtype)
        return entropy.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        input, linear_weight, linear_bias, target, weight, lse, entropy = ctx.saved_tensors
        options, shard, chunk_size, grad_acc_dtype = ctx.args
        needs = ctx.needs_input_grad[1:4]
        none = (None,) * 7
        if not any(needs):
            return (None,) * 4 + none
        g_h = grad.to(entropy.dtype).contiguous()
        grads = recomputed_grads(input, linear_weight, linear_bias, target, weight, lse, options, shard, chunk_size,
                                 grad_acc_dtype, needs, torch.zeros_like(g_h), None, g_h, entropy)
        return (None, *grads) + none
