"""Extreme logits, gradcheck in float64, and the seeds' worked example."""
import math

import pytest
import torch

import fused_softmax_ce as fce
from conftest import DTYPES, assert_close, device_param, random_logits, random_targets, reference


def extreme_logits(kind, dtype, device):
    x = random_logits((6, 37), torch.float32, device)
    if kind == "large":
        x = torch.sign(x) * 1e4 + x  # +-1e4 with a spread
    elif kind == "neg_inf":
        x[:, ::3] = -math.inf  # target classes below avoid these columns
    elif kind == "equal":
        x[:] = 2.5
    return x.to(dtype)


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["large", "neg_inf", "equal"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_extreme_logits(device, dtype, kind, label_smoothing):
    logits = extreme_logits(kind, dtype, device)
    target = torch.arange(6, device=device) * 3 + 1
    x = logits.clone().requires_grad_()
    x_ref = logits.double().clone().requires_grad_()
    out = fce.cross_entropy(x, target, reduction="none", label_smoothing=label_smoothing)
    expected = reference(x_ref, target, reduction="none", label_smoothing=label_smoothing)
    assert_close(out, expected, dtype)
    out.sum().backward()
    expected.sum().backward()
    assert_close(x.grad, x_ref.grad, dtype)
    assert torch.isfinite(x.grad).all()


@device_param()
def test_gradcheck_index_targets(device):
    logits = random_logits((5, 7, 2), torch.float64, device).requires_grad_()
    target = random_targets(7, (5, 2), device, ignore_index=-100)
    weight = torch.rand(7, dtype=torch.float64, device=device) + 0.1
    for reduction in ("mean", "sum", "none"):
        torch.autograd.gradcheck(
            lambda x: fce.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.2),
            (logits,),
        )


@device_param()
def test_gradcheck_probability_targets(device):
    logits = random_logits((4, 6), torch.float64, device).requires_grad_()
    target = torch.rand(4, 6, dtype=torch.float64, device=device).softmax(1).requires_grad_()
    weight = torch.rand(6, dtype=torch.float64, device=device) + 0.1
    torch.autograd.gradcheck(
        lambda x, t: fce.cross_entropy(x, t, weight=weight, label_smoothing=0.1), (logits, target)
    )


@device_param()
@pytest.mark.parametrize("dtype", DTYPES)
def test_seed_worked_example(device, dtype):
    # Seed notebook: softmax([2.0, 1.0, 0.1]) = [0.659, 0.2424, 0.0986]; with
    # true class 0 the loss is 0.41703 and the gradient is softmax - onehot.
    x = torch.tensor([[2.0, 1.0, 0.1]], dtype=dtype, device=device, requires_grad=True)
    loss = fce.cross_entropy(x, torch.tensor([0], device=device))
    loss.backward()
    atol = 1e-6 if dtype in (torch.float32, torch.float64) else 5e-3
    assert abs(loss.item() - 0.4170300162778335) < atol * 10
    expected_grad = torch.tensor([[-0.34099886, 0.24243297, 0.09856589]], dtype=torch.float64)
    torch.testing.assert_close(x.grad.double().cpu(), expected_grad, atol=atol * 10, rtol=0)
