"""torch.compile(fullgraph=True) of the in-place mode's per-row loss and of
linear_cross_entropy's statistics, and their refusal of gradients they do
not compute, compiled as in eager mode."""
import pytest
import torch
import torch.nn.functional as F

import fused_softmax_ce as fce
from conftest import assert_close, compare_with_eager, random_logits, random_targets


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_inplace_rows_then_reduced(reduce):
    def loss_fn(x, y, fn):
        rows = fn(x * 1, y, reduction="none", **({"inplace_backward": True} if fn is fce.cross_entropy else {}))
        return getattr(rows, reduce)()

    x = random_logits((6, 13), torch.float32, "cpu")
    y = random_targets(13, (6,), "cpu", ignore_index=-100)
    compiled = torch.compile(lambda x, y: loss_fn(x, y, fce.cross_entropy), fullgraph=True)
    compare_with_eager(lambda x, y: loss_fn(x, y, F.cross_entropy), compiled, x, y)


def linear_problem():
    h = random_logits((6, 4), torch.float32, "cpu", scale=1.0).requires_grad_()
    w = random_logits((13, 4), torch.float32, "cpu", scale=1.0).requires_grad_()
    return h, w, random_targets(13, (6,), "cpu", ignore_index=-100)


def test_linear_stats():
    h, w, y = linear_problem()

    def stats_of(h, w, y):
        return fce.linear_cross_entropy(h, w, y, z_loss_scale=0.01, return_stats=True)

    expected = stats_of(h, w, y)
    got = torch.compile(stats_of, fullgraph=True)(h, w, y)
    for g, e in zip(got, expected):
        assert_close(g, e, torch.float32)
    expected_grads = torch.autograd.grad(expected.loss, (h, w))
    for g, e in zip(torch.autograd.grad(got.loss, (h, w)), expected_grads):
        assert_close(g, e, torch.float32)


@pytest.mark.parametrize("entry", ["linear", "inplace"])
def test_statistics_gradient_is_refused(entry):
    """Their gradient is not computed: a loss that uses them raises, compiled too."""
    h, w, y = linear_problem()

    def loss_fn(h, w, y):
        if entry == "linear":
            out = fce.linear_cross_entropy(h, w, y, z_loss_scale=0.01, return_stats=True)
        else:
            out = fce.cross_entropy(h @ w.t(), y, z_loss_scale=0.01, return_stats=True, inplace_backward=True)
        return out.loss + out.lse.sum()

    loss = torch.compile(loss_fn, fullgraph=True)(h, w, y)
    with pytest.raises(RuntimeError, match="not differentiable"):
        loss.backward()
