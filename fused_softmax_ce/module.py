"""`CrossEntropyLoss`: the drop-in for `torch.nn.CrossEntropyLoss`."""
import torch
from torch import Tensor, nn
from torch.nn import _reduction as _Reduction

from .functional import cross_entropy


class CrossEntropyLoss(nn.Module):
    """Same constructor and results as `torch.nn.CrossEntropyLoss`.

    ``weight`` is a buffer, so ``.to()`` and ``state_dict`` carry it. The
    keyword-only extras (``inplace_backward``, ``logit_scale``, ``softcap``,
    ``z_loss_scale``, ``return_stats``, ``process_group``) are passed to `cross_entropy`.
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing", "inplace_backward", "logit_scale",
                     "softcap", "z_loss_scale", "return_stats"]

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
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.inplace_backward = inplace_backward
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.z_loss_scale = z_loss_scale
        self.return_stats = return_stats
        self.process_group = process_group

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self._loss(input, target)

    @torch.jit.ignore
    def _loss(self, input: Tensor, target: Tensor) -> Tensor:
        # TorchScript cannot compile cross_entropy (its checks, autograd
        # Functions and custom ops are Python): a scripted module calls it
        # back in Python, so it runs but cannot be saved by torch.jit.save.
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            inplace_backward=self.inplace_backward,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            z_loss_scale=self.z_loss_scale,
            return_stats=self.return_stats,
            process_group=self.process_group,
        )

    def __prepare_scriptable__(self):
        if self.return_stats or self.process_group is not None:
            raise RuntimeError(
                "torch.jit.script(CrossEntropyLoss) supports the loss tensor only, not return_stats=True "
                "(a NamedTuple) or process_group (a ProcessGroup): got "
                f"return_stats={self.return_stats}, process_group={self.process_group}"
            )
        return self

    def extra_repr(self):
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, inplace_backward={self.inplace_backward}, "
            f"logit_scale={self.logit_scale}, softcap={self.softcap}, z_loss_scale={self.z_loss_scale}, "
            f"return_stats={self.return_stats}"
        )
