"""Fake kernels and autograd of the generalized-JSD ops (csrc/jsd_binding.cpp).

The gradient goes to the student logits only: the public functions refuse a
teacher that requires grad, so no teacher gradient is ever asked for.
"""
import torch

from . import _C  # noqa: F401  (importing it registers the ops)
from ._derivatives import acc_dtype

ops = torch.ops.fused_softmax_ce
ROW_STATS = 5  # csrc/jsd_math.h's kJsdStats


@torch.library.register_fake("fused_softmax_ce::jsd_forward")
def _jsd_forward_fake(student, teacher, labels, beta, temperature, ignore_index):
    acc = acc_dtype(student.dtype)
    rows = student.shape[0]
    return student.new_empty(rows, dtype=acc), student.new_empty(rows, ROW_STATS, dtype=acc)


@torch.library.register_fake("fused_softmax_ce::jsd_backward")
def _jsd_backward_fake(grad_output, student, teacher, labels, row_stats, beta, temperature, ignore_index):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


@torch.library.register_fake("fused_softmax_ce::jsd_backward_")
def _jsd_backward_inplace_fake(student, grad_output, teacher, labels, row_stats, beta, temperature, ignore_index):
    return None


def _setup(ctx, inputs, output):
    student, teacher, labels, beta, temperature, ignore_index = inputs
    ctx.save_for_backward(student, teacher, labels, output[1])
    ctx.options = (beta, temperature, ignore_index)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_stats):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 6
    if torch.is_grad_enabled():
        raise RuntimeError("generalized_jsd: double backward (create_graph=True) is not supported")
    student, teacher, labels, stats = ctx.saved_tensors
    grad = ops.jsd_backward(grad_loss.to(stats.dtype).contiguous(), student, teacher, labels, stats, *ctx.options)
    return grad, None, None, None, None, None


torch.library.register_autograd("fused_softmax_ce::jsd_forward", _backward, setup_context=_setup)
