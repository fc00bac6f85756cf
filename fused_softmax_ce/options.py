"""`LossOptions`: every loss option, its checks, and the flat list the ops take.

The public functions and modules build one; the autograd contexts keep it;
`op_args` is the only place that knows the ops' argument order.
"""
import numbers
from typing import NamedTuple

import torch


def _number(name, value):
    """A float from a number, a numpy scalar or a 0-d tensor without grad: the
    kernels take options as constants, so a tensor that requires grad is
    refused rather than left without a gradient."""
    if torch.is_tensor(value):
        if value.dim() != 0 or value.requires_grad or not (value.is_floating_point() or value.dtype == torch.long):
            raise ValueError(f"{name} must be a number or a 0-d tensor without grad, got a tensor of shape "
                             f"{list(value.shape)}, dtype {value.dtype}, requires_grad={value.requires_grad}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _finite(value):
    return value - value == 0  # not inf, not nan (math.isfinite breaks torch.compile's graph)


class LossOptions(NamedTuple):
    """The loss options. The first `_OP_FIELDS` are the ops' own, in the order
    of FSCE_ROW_OPTIONS (csrc/ops.cpp); the rest are compositions in Python
    over the ops' results (z-loss over the lse)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    logit_scale: float = 1.0
    softcap: float = 0.0  # 0.0 (or None before `checked`): no softcap
    z_loss_scale: float = 0.0

    def checked(self):
        """The options as the ops take them (floats, softcap None as 0.0), or PyTorch's error."""
        label_smoothing = float(self.label_smoothing)
        # PyTorch refuses only values over 1, and smooths only for values over
        # 0 (a negative or nan one is no smoothing).
        if label_smoothing > 1.0:
            raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
        logit_scale = _number("logit_scale", self.logit_scale)
        if not _finite(logit_scale) or logit_scale <= 0:
            raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
        softcap = self.softcap
        if softcap is not None:
            softcap = _number("softcap", softcap)
            if not _finite(softcap) or softcap <= 0:
                raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
        z_loss_scale = _number("z_loss_scale", self.z_loss_scale)
        if not _finite(z_loss_scale) or z_loss_scale < 0:
            raise ValueError(f"z_loss_scale must be a finite number >= 0, got {z_loss_scale!r}")
        return LossOptions(self.ignore_index, label_smoothing if label_smoothing > 0.0 else 0.0, logit_scale,
                           softcap or 0.0, z_loss_scale)

    def op_args(self):
        """The ops' flat options, after their tensors."""
        return tuple(self)[:_OP_FIELDS]

    @classmethod
    def split_op_args(cls, args):
        """(LossOptions, the rest) from an op's flat arguments after its tensors."""
        return cls(*args[:_OP_FIELDS]), tuple(args[_OP_FIELDS:])

    def as_kwargs(self):
        """The options as the public functions' keyword arguments (softcap None for none)."""
        return {**self._asdict(), "softcap": self.softcap or None}

    @property
    def transforms_logits(self):
        """Whether the kernels see other logits than the input's (see `_derivatives.effective_logits`)."""
        return self.logit_scale != 1.0 or bool(self.softcap)


_OP_FIELDS = 4  # ignore_index, label_smoothing, logit_scale, softcap


class Shard(NamedTuple):
    """The vocab-parallel shard the ops take after the options: this rank's
    first global class, and all the classes (-1: the logits' own)."""

    class_offset: int = 0
    total_classes: int = -1

    def n_classes(self, logits):
        return self.total_classes if self.total_classes > 0 else logits.shape[1]
