"""The end of every path: the loss in its output dtype and shape, or the
`CrossEntropyStats` with the accuracy from the per-row statistics."""
from typing import NamedTuple

import torch


class RowStats(NamedTuple):
    """The ops' per-row statistics: their outputs after (loss, lse), in that
    order, empty without stats. pred: the first argmax of the effective
    logits; target_pred: that of a probability target (empty for class
    indices). Every path passes them on as one sequence; `finish` and the
    vocab-parallel combination (parallel/shards.py) are what read them."""

    pred: torch.Tensor
    target_pred: torch.Tensor

    @classmethod
    def no_classes(cls, rows):
        """The statistics of rows without classes (no kernel runs), like the float vector rows."""
        return cls(*(torch.zeros_like(rows, dtype=torch.long) for _ in cls._fields))


class CrossEntropyStats(NamedTuple):
    """What `cross_entropy(..., return_stats=True)` returns.

    loss: the loss, z-loss included. z_loss: the reduced z-loss term alone,
    for logging. lse: the per-row log-sum-exp of the effective logits, float32,
    shaped like the ``reduction="none"`` loss, differentiable (0 for ignored
    rows, which are not read). accuracy: the fraction of rows not ignored
    whose argmax equals the target class (the target's argmax for
    probability targets), float32, without grad. entropy: the per-row entropy
    -sum_j p_j log p_j of the softmax of the effective logits, shaped and
    typed like lse, differentiable like it (0 for ignored rows).
    """

    loss: torch.Tensor
    z_loss: torch.Tensor
    lse: torch.Tensor
    accuracy: torch.Tensor
    entropy: torch.Tensor


def finish(loss, z_loss, lse, entropy, row_stats, reduction, loss_shape, out_dtype, return_stats, t, valid,
           count):
    """The loss in its output dtype and shape, or the CrossEntropyStats from
    the `RowStats` fields in row_stats: the accuracy of pred over the rows not
    ignored (`count` of them), against the index target t, or for probability
    targets (valid None) against their argmax target_pred."""
    if reduction == "none":
        loss, z_loss = loss.reshape(loss_shape), z_loss.reshape(loss_shape)
    loss = loss.to(out_dtype)
    if not return_stats:
        return loss
    pred, target_pred = RowStats(*row_stats)
    with torch.no_grad():
        hits = pred == (target_pred if valid is None else t)
        if valid is not None:
            hits = hits & valid
        accuracy = (hits.sum().to(torch.float32) / count).to(torch.float32)
    return CrossEntropyStats(loss, z_loss.to(out_dtype), lse.to(torch.float32).reshape(loss_shape), accuracy,
                             entropy.to(torch.float32).reshape(loss_shape))
