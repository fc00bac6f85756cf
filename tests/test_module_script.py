"""torch.jit.script(CrossEntropyLoss()): it scripts, as nn.CrossEntropyLoss
does, and runs the loss in Python (so it cannot be saved)."""
import io

import pytest
import torch

import fused_softmax_ce as fce
from conftest import assert_close, random_logits, random_target


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(reduction="none", label_smoothing=0.2), dict(weighted=True)],
                         ids=str)
def test_scripted_module_matches_pytorchs(options, prob):
    options = dict(options)
    if options.pop("weighted", False):
        options["weight"] = torch.rand(7, dtype=torch.float64) + 0.1
    x = random_logits((5, 7), torch.float64, "cpu")
    y = random_target((5, 7), torch.float64, "cpu", prob)
    scripted = torch.jit.script(fce.CrossEntropyLoss(**options))
    expected = torch.jit.script(torch.nn.CrossEntropyLoss(**options))
    xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = scripted(xs, y), expected(xe, y)
    assert_close(got, want, torch.float64)
    got.sum().backward()
    want.sum().backward()
    assert_close(xs.grad, xe.grad, torch.float64)


def test_scripted_module_cannot_be_saved_or_return_stats():
    scripted = torch.jit.script(fce.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match="Could not export Python function call '_loss'"):
        torch.jit.save(scripted, io.BytesIO())
    with pytest.raises(RuntimeError, match="return_stats=True"):
        torch.jit.script(fce.CrossEntropyLoss(return_stats=True))
