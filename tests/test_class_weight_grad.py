"""A class weight that requires grad: PyTorch differentiates it for
probability targets (index targets refuse it at the forward: test_errors.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import fused_softmax_ce as fce
from conftest import assert_close, random_logits, random_probs


def problem(shape, dtype=torch.float64):
    x = random_logits(shape, dtype, "cpu")
    y = random_probs(shape, dtype, "cpu")
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.1).to(dtype)
    return x, y, w


@pytest.mark.parametrize("shape", [(5, 7), (3, 6, 4)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_weight_gradient_matches_pytorch(shape, reduction, label_smoothing):
    x, y, w = problem(shape)
    rows = (shape[0],) + shape[2:]
    grad_out = torch.rand(rows, dtype=torch.float64) + 0.5 if reduction == "none" else None
    grads = []
    for fn in (F.cross_entropy, fce.cross_entropy):
        leaves = [t.clone().requires_grad_() for t in (x, y, w)]
        loss = fn(*leaves[:2], weight=leaves[2], reduction=reduction, label_smoothing=label_smoothing)
        loss.backward(grad_out)
        grads.append([t.grad for t in leaves])
    for got, expected in zip(*reversed(grads)):
        assert_close(got, expected, torch.float64)


def test_weight_tangent_matches_pytorch():
    """Forward-mode AD and torch.func.jvp with a weight tangent."""
    x, y, w = problem((5, 7))
    dw = torch.randn_like(w)

    def tangent(fn):
        with forward_ad.dual_level():
            out = fn(x, y, weight=forward_ad.make_dual(w, dw), label_smoothing=0.1)
            return forward_ad.unpack_dual(out).tangent

    assert_close(tangent(fce.cross_entropy), tangent(F.cross_entropy), torch.float64)
    _, got = torch.func.jvp(lambda w: fce.cross_entropy(x, y, weight=w), (w,), (dw,))
    _, expected = torch.func.jvp(lambda w: F.cross_entropy(x, y, weight=w), (w,), (dw,))
    assert_close(got, expected, torch.float64)


@pytest.mark.parametrize("what", ["target", "weight"])
def test_inplace_mode_refuses_what_it_cannot_differentiate(what):
    """Their gradients need the logits, which the in-place forward overwrites."""
    x, y, w = problem((5, 7))
    x = x.requires_grad_() * 1
    y.requires_grad_(what == "target")
    w.requires_grad_(what == "weight")
    with pytest.raises(RuntimeError, match=f"cannot compute the gradient of {what}"):
        fce.cross_entropy(x, y, weight=w, inplace_backward=True)
