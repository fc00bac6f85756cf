"""The end of every path: the loss in its output dtype and shape, or the
`CrossEntropyStats` with the accuracy from the per-row statistics."""
from typing import NamedTuple

import torch


class CrossEntropyStats(NamedTuple):
    """What `cross_entropy(..., return_stats=True)` returns.

    loss: the loss, z-loss included. z_loss: the reduced z-loss term alone,
    for logging. lse: the per-row log-sum-exp of the effective logits, float32,
    shaped like the ``reduction="none"`` loss, differentiable (0 for ignored
    rows, which are not read). accuracy: the fraction of rows not ignored
    whose argmax equals the target class (the target's argmax for
    probability targets), float32, without grad.
    """

    loss: torch.Tensor
    z_loss: torch.Tensor
    lse: torch.Tensor
    accuracy: torch.Tensor


def finish(loss, z_loss, lse, reduction, loss_shape, out_dtype, return_stats, pred, target_pred, t, valid,
           count):
    """The loss in its output dtype and shape, or the CrossEntropyStats with
    the accuracy of pred over the rows not ignored (`count` of them): against
    the index target t, or for probability targets (valid None) against
    their argmax target_pred."""
    if reduction == "none":
        loss, z_loss = loss.reshape(loss_shape), z_loss.reshape(loss_shape)
    loss = loss.to(out_dtype)
    if not return_stats:
        return loss
    with torch.no_grad():
        hits = pred == (target_pred if valid is None else t)
        if valid is not None:
            hits = hits & valid
        accuracy = (hits.sum().to(torch.float32) / count).to(torch.float32)
    return CrossEntropyStats(loss, z_loss.to(out_dtype), lse.to(torch.float32).reshape(loss_shape), accuracy)
