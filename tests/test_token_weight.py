"""token_weight (per-token weights such as RL advantages) against a float64
composition: each row's cross-entropy term times its weight, the mean's
denominator unchanged, the z-loss unweighted, in both modes."""
import pytest
import torch
import torch.nn.functional as F

import fused_softmax_ce as fce
from conftest import assert_close, device_param, random_logits, random_targets

CASES = {
    "plain": dict(),
    "weighted-smooth": dict(weight=True, label_smoothing=0.1),
    "zloss-softcap": dict(z_loss_scale=1e-2, softcap=6.0, logit_scale=1.2),
}


def reference(x, target, token_weight, reduction, weight=None, label_smoothing=0.0, z_loss_scale=0.0,
              softcap=None, logit_scale=1.0):
    v = x.double() * logit_scale
    if softcap:
        v = softcap * torch.tanh(v / softcap)
    w = None if weight is None else weight.double()
    rows = F.cross_entropy(v, target, weight=w, reduction="none", label_smoothing=label_smoothing)
    rows = rows * token_weight.double()
    valid = target != -100
    z = z_loss_scale * torch.where(valid, torch.logsumexp(v, 1), 0.0) ** 2
    if reduction == "none":
        return rows + z
    if reduction == "sum":
        return rows.sum() + z.sum()
    denominator = valid.sum() if w is None else w[target[valid]].sum()  # F.cross_entropy's, unweighted by tokens
    return rows.sum() / denominator + z.sum() / valid.sum()


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape", [(12, 41), (3, 7, 4)], ids=str)
def test_token_weight_matches_float64(device, dtype, case, reduction, inplace, shape):
    options = dict(CASES[case])
    x = random_logits(shape, dtype, device)
    target = random_targets(shape[1], shape[:1] + shape[2:], device, ignore_index=-100, ignore_every=5)
    token_weight = torch.randn(target.shape, dtype=torch.float32, device=device)  # advantages: either sign
    if options.pop("weight", False):
        options["weight"] = (torch.rand(shape[1], dtype=torch.float64, device=device) + 0.2).to(dtype)
    x64 = x.detach().double().clone().requires_grad_()
    expected = reference(x64.movedim(1, -1).reshape(-1, shape[1]), target.reshape(-1), token_weight.reshape(-1),
                         reduction, **options)
    if reduction == "none":
        expected = expected.reshape(target.shape)
    leaf = x.clone().requires_grad_()
    got = fce.cross_entropy(leaf * 1 if inplace else leaf, target, reduction=reduction, token_weight=token_weight,
                            inplace_backward=inplace, **options)
    assert got.dtype == dtype and got.shape == expected.shape
    assert_close(got, expected, dtype)
    g = torch.rand(expected.shape, dtype=torch.float64, device=device) + 0.5
    expected.backward(g)
    got.backward(g.to(got.dtype))
    assert_close(leaf.grad, x64.grad, dtype)
    assert token_weight.grad is None


def test_inplace_folds_the_weight_before_rounding():
    # Large and tiny advantages: the in-place bf16 gradient is rounded once,
    # after the weight, so it matches the default mode's bits.
    x = random_logits((8, 300), torch.bfloat16, "cpu")
    target = random_targets(300, (8,), "cpu")
    token_weight = torch.tensor([1e-30, 3e4, -7.0, 0.0, 1e-3, -2e-20, 1.0, 123.0])
    grads = []
    for inplace in (False, True):
        leaf = x.clone().requires_grad_()
        fce.cross_entropy(leaf * 1, target, reduction="sum", token_weight=token_weight,
                          inplace_backward=inplace).backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    x64 = x.double().requires_grad_()
    (F.cross_entropy(x64, target, reduction="none") * token_weight.double()).sum().backward()
    assert_close(grads[1], x64.grad, torch.bfloat16)
    assert (grads[1][0] != 0).any()  # 1e-30 * p survives in bf16's range: not flushed by an early rounding


@pytest.mark.parametrize("inplace", [False, True])
def test_module_and_linear_take_token_weight(inplace):
    h = random_logits((10, 8), torch.float32, "cpu", scale=1.0)
    w = random_logits((50, 8), torch.float32, "cpu", scale=0.5)
    target = random_targets(50, (10,), "cpu", ignore_index=-100)
    tw = torch.randn(10)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    expected = reference(h64 @ w64.t(), target, tw, "mean")
    expected.backward()
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = fce.LinearCrossEntropyLoss()(hl, wl, target, token_weight=tw)
    assert_close(got, expected, torch.float32)
    got.backward()
    assert_close(hl.grad, h64.grad, torch.float32)
    assert_close(wl.grad, w64.grad, torch.float32)
    module = fce.CrossEntropyLoss(inplace_backward=inplace)
    logits = (h @ w.t()).requires_grad_()
    assert_close(module(logits * 1, target, token_weight=tw), expected, torch.float32)


def test_compile_fullgraph_with_token_weight():
    torch._dynamo.reset()

    def loss_fn(x, y, tw):
        return fce.cross_entropy(x, y, token_weight=tw, label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x = random_logits((8, 40), torch.float32, "cpu")
    y, tw = random_targets(40, (8,), "cpu", ignore_index=-100), torch.randn(8)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = loss_fn(a, y, tw), compiled(b, y, tw)
    expected.backward()
    got.backward()
    assert_close(got, expected, torch.float32)
    assert_close(b.grad, a.grad, torch.float32)


@pytest.mark.parametrize("token_weight, error, match", [
    (torch.ones(4, requires_grad=True), ValueError, "must not require grad"),
    (torch.ones(5), ValueError, r"target's shape \[4\]"),
    (torch.ones(4, 1), ValueError, r"target's shape \[4\]"),
    (torch.ones(4, dtype=torch.long), ValueError, "floating-point"),
    ([1.0, 1.0, 1.0, 1.0], ValueError, "floating-point"),
])
@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_bad_token_weight_raises(token_weight, error, match, fn):
    target = torch.tensor([0, 1, 2, -100])
    with pytest.raises(error, match=match):
        if fn == "cross_entropy":
            fce.cross_entropy(torch.randn(4, 5, requires_grad=True), target, token_weight=token_weight)
        else:
            fce.linear_cross_entropy(torch.randn(4, 3, requires_grad=True), torch.randn(5, 3), target,
                                     token_weight=token_weight)


def test_grpo_example_runs():
    """examples/grpo.py: its first step matches plain PyTorch (it asserts so) and training raises the reward."""
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "examples" / "grpo.py"), "--steps", "25"],
                            capture_output=True, text=True, timeout=300, check=True)
    rewards = [float(r) for r in re.findall(r"mean reward ([0-9.]+)", result.stdout)]
    assert "largest gradient difference" in result.stdout and rewards[-1] > rewards[0], result.stdout
