"""Edge cases of the drop-ins against PyTorch's own cross_entropy (and
linear_cross_entropy for a zero weight sum): unbatched
input, degenerate denominators, label smoothing outside (0, 1], and the LLM
options given as numpy scalars or 0-d tensors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fused_softmax_ce as fce
from conftest import assert_close, random_logits, random_target, reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unbatched_input_with_one_target_gives_a_0d_loss(dtype):
    x = random_logits((7,), dtype, "cpu")
    y = torch.randint(0, 7, (1,))
    expected = reference(x, y, reduction="none")
    got = fce.cross_entropy(x, y, reduction="none")
    assert got.shape == expected.shape == ()
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape", [(4, 0), (3, 0, 2)])
def test_mean_over_no_classes_is_nan(shape, inplace):
    """PyTorch's mean of probability targets without elements is nan, also with rows."""
    x = torch.randn(shape, dtype=torch.float64).requires_grad_() * 1
    y = torch.rand(shape, dtype=torch.float64)
    expected = F.cross_entropy(x, y)
    got = fce.cross_entropy(x, y, inplace_backward=inplace)
    assert expected.isnan() and got.isnan()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_weights_summing_to_zero_give_pytorchs_infinity(sign, label_smoothing, inplace):
    """Class weights (a, -a, 0, ...) over rows of targets 0 and 1: w_y sums to
    0 but the weighted losses do not, so PyTorch's mean is an infinity, its
    nll and smoothing terms each divided by that 0. Class 1 dominating every
    row fixes the sign of both terms."""
    c = 6
    w = torch.zeros(c, dtype=torch.float64)
    w[0] = sign * (torch.rand(()).item() + 0.5)
    w[1] = -w[0]
    y = torch.tensor([0, 1, 0, 1])
    x = random_logits((4, c), torch.float64, "cpu")
    x[:, 1] += 20
    expected = reference(x, y, weight=w, label_smoothing=label_smoothing)
    got = fce.cross_entropy(x.clone().requires_grad_() * 1, y, weight=w, label_smoothing=label_smoothing,
                            inplace_backward=inplace)
    assert expected.isinf()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("chunk_size", [2, None])
def test_linear_smoothed_mean_over_rows_of_no_weight(chunk_size):
    """As cross_entropy: the targets' classes weigh 0 and the others do not,
    so the smoothing term is finite over a 0 weight sum, but PyTorch's mean
    is nan: its nll term is 0 / 0."""
    h, w = random_logits((4, 3), torch.float64, "cpu"), random_logits((6, 3), torch.float64, "cpu")
    cw = torch.rand(6, dtype=torch.float64) + 0.1
    cw[:2] = 0
    y = torch.randint(0, 2, (4,))
    expected = F.linear_cross_entropy(h, w, y, weight=cw, label_smoothing=0.2)
    got = fce.linear_cross_entropy(h.requires_grad_(), w, y, weight=cw, label_smoothing=0.2, chunk_size=chunk_size)
    assert expected.isnan() and got.isnan()


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("label_smoothing", [-0.3, -2.0, float("nan"), float("-inf")])
def test_label_smoothing_at_most_zero_is_no_smoothing(label_smoothing, prob):
    x = random_logits((5, 7), torch.float64, "cpu")
    y = random_target((5, 7), torch.float64, "cpu", prob)
    got = fce.cross_entropy(x, y, label_smoothing=label_smoothing)
    assert_close(got, reference(x, y, label_smoothing=label_smoothing), torch.float64)


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
@pytest.mark.parametrize("name, value", [("logit_scale", 0.7), ("softcap", 3.0), ("z_loss_scale", 0.01)])
def test_scalar_options_as_numpy_or_0d_tensors(name, value, kind):
    x = random_logits((5, 7), torch.float64, "cpu")
    y = random_target((5, 7), torch.float64, "cpu", False)
    given = np.float32(value) if kind == "numpy" else torch.tensor(value)
    torch.testing.assert_close(fce.cross_entropy(x, y, **{name: given}), fce.cross_entropy(x, y, **{name: float(given)}))


def test_option_tensor_that_requires_grad_is_refused():
    """The kernels take the option as a constant: its gradient would be lost."""
    with pytest.raises(ValueError, match="logit_scale must be a number or a 0-d tensor without grad"):
        fce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), logit_scale=torch.tensor(2.0, requires_grad=True))

