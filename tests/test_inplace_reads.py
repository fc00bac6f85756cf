"""The in-place mode overwrites the logits with their gradient. Reads of the
logits after the call see gradient values; autograd catches them where a
version counter can (docs/contracts.md, "The in-place mode's contract", lists what it
cannot)."""
import pytest
import torch

import fused_softmax_ce as fce
from conftest import random_logits, random_targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_logits_saved_after_the_call_raise_in_a_later_backward(reduction):
    """A term that saved the logits after the loss call, differentiated after the loss."""
    z = random_logits((5, 9), torch.float64, "cpu").requires_grad_()
    x = z * 1
    loss = fce.cross_entropy(x, random_targets(9, (5,), "cpu"), reduction=reduction, inplace_backward=True)
    regulariser = (x ** 2).sum()  # saves x, which now holds the gradient
    loss.backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        regulariser.backward()

