"""Gradient layouts: row-padded logits (a slice of wider rows) get a gradient with their row stride and
16-byte phase (so that the CUDA row kernels keep their vector path), equal to PyTorch's."""
import math

import pytest
import torch

import fused_softmax_ce as fce
from conftest import DTYPES, assert_close, device_param, random_logits, random_targets, reference

ops = torch.ops.fused_softmax_ce


def row_padded(shape, dtype, device, pad=21, offset=3):
    """Logits of `shape` whose rows are columns [offset, offset + C) of rows pad columns wider."""
    n, c, *rest = shape
    return random_logits((n, c + pad, *rest), dtype, device)[:, offset : offset + c]


@device_param()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 37), (3, 7, 5)])
def test_row_padded_gradient(device, dtype, shape):
    x = row_padded(shape, dtype, device).requires_grad_()
    target = random_targets(shape[1], (shape[0],) + shape[2:], device, ignore_index=-100)
    weight = (torch.rand(shape[1], device=device) + 0.1).to(dtype)
    loss = fce.cross_entropy(x, target, weight, label_smoothing=0.1)
    loss.backward()
    x_ref = x.detach().double().requires_grad_()
    expected = reference(x_ref, target, weight, label_smoothing=0.1)
    expected.backward()
    assert_close(loss, expected, dtype)
    assert_close(x.grad, x_ref.grad, dtype)


@device_param()
@pytest.mark.parametrize("shape", [(6, 37), (3, 7, 5)])
def test_row_padded_gradient_keeps_the_layout(device, shape):
    x = row_padded(shape, torch.bfloat16, device)
    target = random_targets(shape[1], (shape[0],) + shape[2:], device).reshape(-1)  # the ops' rows
    loss, lse, _, _, _ = ops.ce_forward(x, target, None, -100, 0.0)
    grad = ops.ce_backward(torch.rand_like(loss), None, x, target, None, lse, -100, 0.0)
    phase = 16 // x.element_size()
    # The row stride's phase, with under 16 bytes of padding a row: not the slice's wide rows.
    assert grad.stride()[1:] == x.stride()[1:] and grad.stride(0) % phase == x.stride(0) % phase
    assert x.shape[1] * math.prod(x.shape[2:]) <= grad.stride(0) < x.shape[1] * math.prod(x.shape[2:]) + phase
    assert grad.data_ptr() % 16 == x.data_ptr() % 16
    # The fake kernel (torch.compile) gives the same strides.
    torch.library.opcheck(ops.ce_backward, (torch.rand_like(loss), None, x, target, None, lse, -100, 0.0))


@device_param()
def test_overlapping_rows_get_a_contiguous_gradient(device):
    x0 = random_logits((1, 37), torch.float32, device).requires_grad_()
    target = random_targets(37, (4,), device)
    loss = fce.cross_entropy(x0.expand(4, 37), target, reduction="sum")  # rows with stride 0
    loss.backward()
    lse = ops.ce_forward(x0.detach().expand(4, 37), target, None, -100, 0.0)[1]
    grad = ops.ce_backward(torch.rand_like(lse, dtype=torch.float32), None, x0.detach().expand(4, 37), target,
                           None, lse, -100, 0.0)
    assert grad.is_contiguous()
    x_ref = x0.detach().double().requires_grad_()
    expected = reference(x_ref.expand(4, 37), target, reduction="sum")
    expected.backward()
    assert_close(loss, expected, torch.float32)
    assert_close(x0.grad, x_ref.grad, torch.float32)


@device_param()
@pytest.mark.parametrize("make", ["unfold", "as_strided"])
def test_inplace_refuses_partly_overlapping_rows(device, make):
    """Rows that share memory but no element: ATen's overlap check cannot
    tell, and writing one row's gradient would change the next row's logits."""
    flat = random_logits((40,), torch.float32, device).requires_grad_()
    base = flat * 1
    x = base.unfold(0, 8, 4) if make == "unfold" else base.as_strided((4, 8), (4, 1))
    target = random_targets(8, (x.shape[0],), device)
    before = base.detach().clone()
    with pytest.raises(RuntimeError, match="rows overlap in memory"):
        fce.cross_entropy(x, target, inplace_backward=True)
    assert torch.equal(base.detach(), before)
    with pytest.raises(RuntimeError, match="rows overlap in memory"):
        ops.scale_grad_(x.detach(), torch.ones(x.shape[0], device=device))
    # The default mode reads them as they are.
    loss = fce.cross_entropy(x, target)
    assert_close(loss, reference(x.detach(), target), torch.float32)


# Losses in the accumulation dtype: a half loss's .to() backward hands over a dense copy.
@device_param()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 37), (3, 7, 5)])
def test_inplace_broadcast_grad_output_stays_one_value(device, dtype, shape, monkeypatch):
    from fused_softmax_ce import _inplace

    seen = []

    class Spy:  # the package's ops, recording what scale_grad_ gets
        def __getattr__(self, name):
            return getattr(ops, name)

        def scale_grad_(self, grad, grad_output):
            seen.append(grad_output)
            return ops.scale_grad_(grad, grad_output)

    monkeypatch.setattr(_inplace, "ops", Spy())
    x = random_logits(shape, dtype, device).requires_grad_()
    target = random_targets(shape[1], (shape[0],) + shape[2:], device, ignore_index=-100)
    loss = fce.cross_entropy(x * 1, target, reduction="none", inplace_backward=True)
    (loss.sum() * 3).backward()  # grad_output: 3 broadcast over every row
    assert len(seen) == 1 and seen[0].numel() == 1
    x_ref = x.detach().double().requires_grad_()
    (reference(x_ref, target, reduction="none").sum() * 3).backward()
    assert_close(x.grad, x_ref.grad, dtype)
