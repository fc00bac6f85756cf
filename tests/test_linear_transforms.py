"""linear_cross_entropy under forward-mode AD, torch.func and autocast, against
PyTorch's cross_entropy(linear(...)) (float64, or autocast's own)."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import fused_softmax_ce as fce
from conftest import assert_close, random_logits, random_targets

N, H, V = 6, 5, 11


def problem(dtype=torch.float64, bias=True):
    x = random_logits((N, H), dtype, "cpu", scale=1.0)
    w = random_logits((V, H), dtype, "cpu", scale=1.0)
    b = random_logits((V,), dtype, "cpu", scale=1.0) if bias else None
    y = random_targets(V, (N,), "cpu", ignore_index=-100)
    return x, w, b, y


def reference(x, w, y, b=None, **kwargs):
    return F.cross_entropy(F.linear(x, w, b), y, **kwargs)


OPTIONS = [dict(), dict(reduction="sum", label_smoothing=0.2), dict(reduction="none")]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_forward_mode_tangent(options):
    x, w, b, y = problem()
    tangents = [torch.randn_like(t) for t in (x, w, b)]

    def tangent(fn):
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(t, d) for t, d in zip((x, w, b), tangents)]
            out = fn(duals[0], duals[1], y, linear_bias=duals[2], **options)
            return forward_ad.unpack_dual(out).tangent

    expected = tangent(lambda x, w, y, linear_bias, **kw: reference(x, w, y, linear_bias, **kw))
    got = tangent(fce.linear_cross_entropy)
    assert got is not None
    assert_close(got, expected, torch.float64)


class Head(torch.nn.Module):
    """An output layer and its loss, for functional_call."""

    def __init__(self, loss_fn):
        super().__init__()
        self.linear = torch.nn.Linear(H, V, dtype=torch.float64)
        self.loss_fn = loss_fn

    def forward(self, x, y):
        return self.loss_fn(x, self.linear.weight, y, linear_bias=self.linear.bias)


@pytest.mark.parametrize("transform", ["jvp", "grad", "jacrev", "functional_call"])
def test_torch_func(transform):
    x, w, b, y = problem()
    dx, dw = torch.randn_like(x), torch.randn_like(w)

    def run(fn):
        if transform == "jvp":
            return torch.func.jvp(lambda x, w: fn(x, w, y, linear_bias=b), (x, w), (dx, dw))
        if transform == "grad":
            return torch.func.grad(lambda x, w: fn(x, w, y, linear_bias=b), argnums=(0, 1))(x, w)
        if transform == "jacrev":
            return torch.func.jacrev(lambda x: fn(x, w, y, linear_bias=b, reduction="none"))(x)
        params = {"linear.weight": w, "linear.bias": b}
        return torch.func.grad(lambda p: torch.func.functional_call(Head(fn), p, (x, y)))(params)

    expected = run(lambda x, w, y, linear_bias, **kw: reference(x, w, y, linear_bias, **kw))
    got = run(fce.linear_cross_entropy)
    for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        assert_close(g, e, torch.float64)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 3, (torch.bfloat16, torch.float32, torch.float32),
                                    (torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_matches_pytorch(dtypes, reduction):
    """Autocast runs the linear in bfloat16 whatever the inputs' dtypes, and
    the loss in float32; the class weight stays float32."""
    x, w, b, y = problem(torch.float32)
    x, w, b = (t.to(dt).requires_grad_() for t, dt in zip((x, w, b), dtypes))
    cw = torch.rand(V) + 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction)
        got = fce.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction)
    assert got.dtype == expected.dtype == torch.float32
    assert_close(got, expected, torch.bfloat16)
    grad_out = torch.rand_like(expected) + 0.5
    expected_grads = torch.autograd.grad(expected, (x, w, b), grad_out)
    for g, e in zip(torch.autograd.grad(got, (x, w, b), grad_out), expected_grads):
        assert g.dtype == e.dtype
        assert_close(g, e, torch.bfloat16)
