"""Bad input raises PyTorch's exception type, with a message naming the problem."""
import pytest
import torch
import torch.nn.functional as F

import fused_softmax_ce as fce
from conftest import device_param

x = torch.randn(3, 5)


def cases(device):
    x = torch.randn(3, 5, device=device)
    y = torch.tensor([0, 1, 2], device=device)
    return {
        "target_too_large": (x, torch.tensor([0, 1, 5], device=device), {}),
        "target_negative": (x, torch.tensor([0, -3, 2], device=device), {}),
        "target_float_wrong_shape": (x, torch.tensor([0.0, 1.0, 2.0], device=device), {}),
        "target_int32": (x, y.int(), {}),
        "batch_mismatch": (x, torch.tensor([0, 1], device=device), {}),
        "spatial_mismatch": (torch.randn(2, 5, 4, device=device), torch.zeros(2, 3, dtype=torch.long, device=device), {}),
        "prob_target_long": (x, torch.zeros(3, 5, dtype=torch.long, device=device), {}),
        "prob_target_ignore_index": (x, torch.rand(3, 5, device=device), {"ignore_index": 1}),
        "weight_length": (x, y, {"weight": torch.ones(4, device=device)}),
        "weight_dtype": (x, y, {"weight": torch.ones(5, dtype=torch.float64, device=device)}),
        "weight_2d": (x, y, {"weight": torch.ones(5, 1, device=device)}),
        "label_smoothing": (x, y, {"label_smoothing": 1.5}),
        "reduction": (x, y, {"reduction": "average"}),
        "integer_logits": (x.long(), y, {}),
        "zero_classes": (torch.randn(3, 0, device=device), y, {}),
    }


@device_param(["cpu"])  # CUDA marks invalid targets with nan instead (no host sync)
@pytest.mark.parametrize("name", sorted(cases("cpu")))
def test_same_exception_type_as_pytorch(device, name):
    logits, target, kwargs = cases(device)[name]
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(logits, target, **kwargs)
    with pytest.raises(theirs.type) as ours:
        fce.cross_entropy(logits, target, **kwargs)
    assert str(ours.value), "the message must say what is wrong"


def test_out_of_range_message_names_the_value():
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        fce.cross_entropy(torch.randn(2, 4), torch.tensor([1, 7]))


def test_weight_on_other_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(RuntimeError, match="weight"):
        fce.cross_entropy(torch.randn(2, 4), torch.tensor([1, 2]), weight=torch.ones(4, device="cuda"))


def test_mismatched_devices_are_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(RuntimeError):
        fce.cross_entropy(torch.randn(2, 4, device="cuda"), torch.tensor([1, 2]))


def test_ops_check_their_inputs_directly():
    ops = torch.ops.fused_softmax_ce
    with pytest.raises(RuntimeError, match="2-D"):
        ops.ce_forward(torch.randn(5), torch.tensor([1]), None, -100, 0.0)
    with pytest.raises(RuntimeError, match="one entry per row"):
        ops.ce_forward(torch.randn(3, 4), torch.tensor([1]), None, -100, 0.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.ce_forward_inplace(torch.randn(4, 3).t(), torch.tensor([1, 2, 0]), None, torch.ones(()), -100, 0.0)


def shape_cases(device):
    """Input and target shapes PyTorch refuses, each with its own message."""
    long = dict(dtype=torch.long, device=device)
    return {
        "1d_input_2d_target": (torch.randn(5, device=device), torch.zeros(1, 1, **long)),
        "1d_input_two_targets": (torch.randn(5, device=device), torch.zeros(2, **long)),
        "1d_input_no_target": (torch.randn(5, device=device), torch.zeros(0, **long)),
        "0d_input_0d_index_target": (torch.tensor(1.0, device=device), torch.tensor(0, device=device)),
        "0d_input_0d_float_target": (torch.tensor(1.0, device=device), torch.tensor(0.0, device=device)),
        "0d_input_1d_target": (torch.tensor(1.0, device=device), torch.zeros(1, **long)),
        "multi_target": (torch.randn(4, 5, device=device), torch.zeros(4, 3, **long)),
        "multi_target_float": (torch.randn(4, 5, device=device), torch.zeros(4, 3, device=device)),
        "4d_input_2d_target": (torch.randn(2, 5, 3, 4, device=device), torch.zeros(2, 3, **long)),
        "4d_input_4d_target": (torch.randn(2, 5, 3, 4, device=device), torch.zeros(2, 3, 4, 1, **long)),
        "4d_input_wrong_size": (torch.randn(2, 5, 3, 4, device=device), torch.zeros(2, 3, 5, **long)),
    }


@device_param(["cpu"])
@pytest.mark.parametrize("name", sorted(shape_cases("cpu")))
def test_shape_errors_match_pytorch(device, name):
    logits, target = shape_cases(device)[name]
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(logits, target)
    with pytest.raises(theirs.type) as ours:
        fce.cross_entropy(logits, target)
    assert str(ours.value) == str(theirs.value)


def test_weight_that_requires_grad_raises_at_the_forward_for_index_targets():
    """PyTorch's nll_loss refuses it at the forward (only with grad mode on);
    probability targets give the weight its gradient (tests/test_class_weight_grad.py)."""
    x = torch.randn(4, 5)
    target = torch.randint(0, 5, (4,))
    weight = (torch.rand(5) + 0.1).requires_grad_()
    for fn in (F.cross_entropy, fce.cross_entropy):
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
            fn(x, target, weight=weight)
        with torch.no_grad():
            fn(x, target, weight=weight)
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    for fn in (F.linear_cross_entropy, fce.linear_cross_entropy):
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
            fn(h, w, target, weight=weight)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        fce.cross_entropy(x.clone().requires_grad_() * 1, target, weight=weight, inplace_backward=True)
