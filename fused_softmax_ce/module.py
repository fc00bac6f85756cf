"""The modules: `CrossEntropyLoss`, the drop-in for `torch.nn.CrossEntropyLoss`,
and `LinearCrossEntropyLoss` for `linear_cross_entropy`.

Each keeps every `LossOptions` field as an attribute of its own name, as
PyTorch's modules do (so they can be read and set), and passes them all on.
"""
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import _reduction as _Reduction

from .functional import cross_entropy
from .linear import linear_cross_entropy
from .options import LossOptions


def _set_options(module, options):
    for name, value in options._asdict().items():
        setattr(module, name, value)


def _options(module):
    """The module's options as keyword arguments of the functions."""
    return {name: getattr(module, name) for name in LossOptions._fields}


def _options_repr(module):
    return ", ".join(f"{name}={getattr(module, name)!r}" for name in LossOptions._fields)


class CrossEntropyLoss(nn.Module):
    """Same constructor and results as `torch.nn.CrossEntropyLoss`.

    ``weight`` is a buffer, so ``.to()`` and ``state_dict`` carry it. The
    keyword-only extras (``inplace_backward``, ``logit_scale``, ``softcap``,
    ``z_loss_scale``, ``return_stats``, ``process_group``) are passed to `cross_entropy`.
    """

    __constants__ = ["reduction", "inplace_backward", "return_stats", *LossOptions._fields]

    def __init__(
        self,
        weight=None,
        size_average=None,
        ignore_index=-100,
        reduce=None,
        reduction="mean",
        label_smoothing=0.0,
        *,
        inplace_backward=False,
        logit_scale=1.0,
        softcap=None,
        z_loss_scale=0.0,
        return_stats=False,
        process_group=None,
    ):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _Reduction.legacy_get_string(size_average, reduce)
        self.reduction = reduction
        self.register_buffer("weight", weight)
        _set_options(self, LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing,
                                       logit_scale=logit_scale, softcap=softcap, z_loss_scale=z_loss_scale))
        self.inplace_backward = inplace_backward
        self.return_stats = return_stats
        self.process_group = process_group

    def forward(self, input: Tensor, target: Tensor, token_weight: Optional[Tensor] = None) -> Tensor:
        return self._loss(input, target, token_weight)

    @torch.jit.ignore
    def _loss(self, input: Tensor, target: Tensor, token_weight: Optional[Tensor]) -> Tensor:
        # TorchScript cannot compile cross_entropy (its checks, autograd
        # Functions and custom ops are Python): a scripted module calls it
        # back in Python, so it runs but cannot be saved by torch.jit.save.
        return cross_entropy(input, target, weight=self.weight, reduction=self.reduction,
                             inplace_backward=self.inplace_backward, return_stats=self.return_stats,
                             token_weight=token_weight, process_group=self.process_group, **_options(self))

    def __prepare_scriptable__(self):
        if self.return_stats or self.process_group is not None:
            raise RuntimeError(
                "torch.jit.script(CrossEntropyLoss) supports the loss tensor only, not return_stats=True "
                "(a NamedTuple) or process_group (a ProcessGroup): got "
                f"return_stats={self.return_stats}, process_group={self.process_group}"
            )
        return self

    def extra_repr(self):
        return (f"reduction={self.reduction!r}, {_options_repr(self)}, inplace_backward={self.inplace_backward}, "
                f"return_stats={self.return_stats}")


class LinearCrossEntropyLoss(nn.Module):
    """A module for `linear_cross_entropy`: the constructor takes its keyword options
    (weight, reduction, ignore_index, label_smoothing, chunk_size, grad_acc_dtype, and
    keyword-only logit_scale, softcap, z_loss_scale, return_stats, process_group);
    ``weight`` is a buffer, so ``.to()`` and ``state_dict`` carry it.
    """

    def __init__(self, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                 chunk_size=None, grad_acc_dtype=None, *, logit_scale=1.0, softcap=None,
                 z_loss_scale=0.0, return_stats=False, process_group=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        _set_options(self, LossOptions(ignore_index=ignore_index, label_smoothing=label_smoothing,
                                       logit_scale=logit_scale, softcap=softcap, z_loss_scale=z_loss_scale))
        self.chunk_size = chunk_size
        self.grad_acc_dtype = grad_acc_dtype
        self.return_stats = return_stats
        self.process_group = process_group

    def forward(self, input, linear_weight, target, linear_bias=None, token_weight=None):
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
            chunk_size=self.chunk_size, grad_acc_dtype=self.grad_acc_dtype, return_stats=self.return_stats,
            token_weight=token_weight, process_group=self.process_group, **_options(self))

    def extra_repr(self):
        return f"reduction={self.reduction!r}, {_options_repr(self)}, chunk_size={self.chunk_size}"
