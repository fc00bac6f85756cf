"""Forward and backward parity with torch.nn.functional.cross_entropy, in float64."""
import pytest
import torch

import fused_softmax_ce as fce
from conftest import (
    DTYPES,
    assert_close,
    device_param,
    random_logits,
    random_probs,
    random_targets,
    reference,
)

REDUCTIONS = ["mean", "sum", "none"]


def check(logits, target, dtype, weight=None, inplace=False, **kwargs):
    x = logits.detach().clone().requires_grad_()
    x_ref = logits.detach().double().clone().requires_grad_()
    expected = reference(x_ref, target, weight=weight, **kwargs)
    if inplace:
        # The in-place mode needs a non-leaf whose storage it may overwrite.
        base = x * 1
        out = fce.cross_entropy(base, target, weight=weight, inplace_backward=True, **kwargs)
    else:
        out = fce.cross_entropy(x, target, weight=weight, **kwargs)
    assert out.dtype == (torch.result_type(logits, target) if target.is_floating_point() else dtype)
    assert out.shape == expected.shape
    assert_close(out, expected, dtype)
    if expected.numel() == 0:
        return
    grad_out = torch.rand_like(expected) + 0.5
    expected.backward(grad_out)
    out.backward(grad_out.to(out.dtype))
    assert_close(x.grad, x_ref.grad, dtype)


@device_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("n,c", [(7, 3), (5, 423), (1, 2)])
@pytest.mark.parametrize("inplace", [False, True])
def test_index_targets(device, dtype, reduction, weighted, label_smoothing, ignore, n, c, inplace):
    logits = random_logits((n, c), dtype, device)
    target = random_targets(c, (n,), device, ignore_index=-100 if ignore else None)
    weight = (torch.rand(c, device=device) + 0.1).to(dtype) if weighted else None
    check(logits, target, dtype, weight=weight, inplace=inplace, reduction=reduction,
          label_smoothing=label_smoothing)


@device_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (0, 5), (4, 50257)])
def test_odd_sizes(device, dtype, shape):
    logits = random_logits(shape, dtype, device)
    target = random_targets(shape[1], (shape[0],), device)
    for reduction in REDUCTIONS:
        check(logits, target, dtype, reduction=reduction, label_smoothing=0.05)


@device_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 7, 9), (6, 11)])
@pytest.mark.parametrize("inplace", [False, True])
def test_probability_targets(device, dtype, reduction, weighted, label_smoothing, shape, inplace):
    logits = random_logits(shape, dtype, device)
    target = random_probs(shape, dtype, device)
    weight = (torch.rand(shape[1], device=device) + 0.1).to(dtype) if weighted else None
    check(logits, target, dtype, weight=weight, inplace=inplace, reduction=reduction,
          label_smoothing=label_smoothing)


@device_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 7, 1), (2, 3, 5, 2, 3)])
@pytest.mark.parametrize("inplace", [False, True])
def test_kdim_index_targets(device, dtype, reduction, shape, inplace):
    logits = random_logits(shape, dtype, device)
    target = random_targets(shape[1], (shape[0],) + shape[2:], device, ignore_index=1, ignore_every=3)
    weight = (torch.rand(shape[1], device=device) + 0.1).to(dtype)
    check(logits, target, dtype, weight=weight, inplace=inplace, ignore_index=1,
          reduction=reduction, label_smoothing=0.1)


@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unbatched(device, dtype):
    logits = random_logits((9,), dtype, device)
    check(logits, torch.tensor(4, device=device), dtype, label_smoothing=0.1)
    check(logits, torch.rand(9, device=device, dtype=dtype).softmax(0), dtype)


@device_param()
def test_non_contiguous_logits(device):
    wide = random_logits((6, 40), torch.float32, device)
    target = random_targets(17, (6,), device)
    check(wide[:, :17], target, torch.float32)  # row-padded: no copy needed
    check(random_logits((17, 6), torch.float32, device).t(), target, torch.float32)


@device_param()
def test_all_rows_ignored_mean_is_nan(device):
    logits = random_logits((4, 5), torch.float32, device)
    target = torch.full((4,), -100, device=device)
    for weight in (None, torch.rand(5, device=device)):
        out = fce.cross_entropy(logits, target, weight=weight)
        assert torch.isnan(out)
        assert torch.isnan(reference(logits, target, weight=weight))


@device_param()
def test_uint8_targets_and_legacy_arguments(device):
    logits = random_logits((8, 6), torch.float32, device)
    target = random_targets(6, (8,), device)
    assert_close(fce.cross_entropy(logits, target.to(torch.uint8)), reference(logits, target), torch.float32)
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        out = fce.cross_entropy(logits, target, size_average=size_average, reduce=reduce)
        expected = reference(logits, target, size_average=size_average, reduce=reduce)
        assert_close(out, expected, torch.float32)


@device_param()
def test_soft_target_gradient(device):
    logits = random_logits((5, 6), torch.float64, device)
    target = torch.rand(5, 6, dtype=torch.float64, device=device).softmax(1).requires_grad_()
    weight = torch.rand(6, dtype=torch.float64, device=device)
    fce.cross_entropy(logits, target, weight=weight, label_smoothing=0.3).backward()
    t_ref = target.detach().clone().requires_grad_()
    reference(logits, t_ref, weight=weight, label_smoothing=0.3).backward()
    assert_close(target.grad, t_ref.grad, torch.float64)
