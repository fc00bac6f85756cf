"""opcheck, torch.compile, the in-place mode's contract, the module and the seeds' demo."""
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_softmax_ce as fce
from conftest import assert_close, compare_with_eager, device_param, random_logits, random_probs, random_targets

ops = torch.ops.fused_softmax_ce
ROOT = pathlib.Path(__file__).resolve().parents[1]


@device_param()
def test_opcheck(device):
    x = random_logits((6, 11), torch.float32, device)
    y = random_targets(11, (6,), device, ignore_index=-100)
    w = torch.rand(11, device=device) + 0.1
    probs = random_probs((6, 11), torch.float32, device)
    for target, weight in [(y, None), (y, w), (probs, w)]:
        torch.library.opcheck(ops.ce_forward, (x.clone().requires_grad_(), target, weight, -100, 0.1))
        loss, lse, _, _, _ = ops.ce_forward(x, target, weight, -100, 0.1)
        for grad_lse in (None, torch.rand_like(lse)):
            torch.library.opcheck(ops.ce_backward, (torch.rand_like(loss).requires_grad_(), grad_lse, x.clone().requires_grad_(), target, weight, lse, -100, 0.1))
        torch.library.opcheck(
            ops.ce_forward_inplace, (x.clone(), target, weight, torch.ones((), device=device), -100, 0.1)
        )
    x3 = random_logits((2, 5, 3), torch.float32, device)
    torch.library.opcheck(ops.scale_grad_, (x3.clone(), torch.rand(6, device=device)))
    torch.library.opcheck(ops.scale_grad_, (x3.clone(), torch.rand((), device=device)))


@device_param()
def test_compile_fullgraph_dynamic(device):
    torch._dynamo.reset()

    def loss_fn(x, y, w):
        return fce.cross_entropy(x, y, weight=w, label_smoothing=0.1)

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True)
    for n, c in [(8, 33), (13, 70)]:
        x = random_logits((n, c), torch.float32, device)
        y = random_targets(c, (n,), device, ignore_index=-100)
        w = torch.rand(c, device=device) + 0.1
        compare_with_eager(loss_fn, compiled, x, y, w)


@device_param()
def test_compile_fullgraph_inplace(device):
    torch._dynamo.reset()

    def loss_fn(x, y):
        return fce.cross_entropy(x * 1, y, label_smoothing=0.1, inplace_backward=True)

    compiled = torch.compile(loss_fn, fullgraph=True)
    x = random_logits((8, 33), torch.float32, device)
    y = random_targets(33, (8,), device)
    compare_with_eager(loss_fn, compiled, x, y)


@device_param()
def test_inplace_overwrites_logits_and_allocates_no_grad_buffer(device):
    w_in = torch.randn(16, 50, device=device, requires_grad=True)
    feats = torch.randn(12, 16, device=device)
    y = random_targets(50, (12,), device)
    logits = feats @ w_in
    before = logits.detach().clone()
    fce.cross_entropy(logits, y, inplace_backward=True).backward()
    grad_inplace = w_in.grad.clone()
    assert not torch.equal(logits.detach(), before), "the gradient is written into the logits"
    w_in.grad = None
    F.cross_entropy(feats @ w_in, y).backward()
    assert_close(grad_inplace, w_in.grad, torch.float32)


@device_param()
def test_inplace_raises_when_logits_were_saved_elsewhere(device):
    x = torch.randn(6, 9, device=device, requires_grad=True)
    logits = x * 2
    aux = (logits**2).sum()  # pow saves logits for its backward
    loss = fce.cross_entropy(logits, random_targets(9, (6,), device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + aux).backward()


@device_param()
def test_inplace_is_off_without_grad(device):
    logits = random_logits((4, 7), torch.float32, device)
    before = logits.clone()
    with torch.no_grad():
        fce.cross_entropy(logits.requires_grad_(), random_targets(7, (4,), device), inplace_backward=True)
    assert torch.equal(logits.detach(), before)


def test_scale_grad_skips_the_pass_for_unit_scale():
    grad = random_logits((3, 4), torch.float32, "cpu")
    before = grad.clone()
    ops.scale_grad_(grad, torch.ones(()))
    assert torch.equal(grad, before)
    ops.scale_grad_(grad, torch.full((), 2.0))
    assert torch.equal(grad, before * 2)


@device_param()
def test_module_weight_is_a_buffer(device):
    weight = torch.rand(5) + 0.1
    loss_fn = fce.CrossEntropyLoss(weight=weight, ignore_index=2, label_smoothing=0.1).to(device)
    assert loss_fn.weight.device.type == device
    assert "weight" in loss_fn.state_dict()
    ref_fn = nn.CrossEntropyLoss(weight=weight.to(device), ignore_index=2, label_smoothing=0.1)
    x = random_logits((6, 5), torch.float32, device)
    y = random_targets(5, (6,), device)
    assert_close(loss_fn(x, y), ref_fn(x, y), torch.float32)
    assert "label_smoothing=0.1" in repr(loss_fn)


def _train(criterion):
    torch.manual_seed(1234)
    model = nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[2.0, 1.0, 0.1]])
    y = torch.tensor([0])
    losses = []
    for _ in range(100):
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, torch.softmax(model(x), dim=1).detach()


def test_seed_softmax_regression_trajectory():
    ours, ours_probs = _train(fce.CrossEntropyLoss())
    theirs, their_probs = _train(nn.CrossEntropyLoss())
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_probs, their_probs, atol=1e-6, rtol=1e-5)
    assert ours[-1] < 0.02 < ours[0]
    assert ours_probs.argmax().item() == 0


def test_example_script_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "softmax_regression.py")],
        capture_output=True, text=True, check=True, timeout=300,
    )
    assert "Epoch 90" in result.stdout
    assert "Predicted class: 0" in result.stdout
