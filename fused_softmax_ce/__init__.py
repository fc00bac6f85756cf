"""Fused softmax cross-entropy for PyTorch, a drop-in for `F.cross_entropy`."""
from ._finish import CrossEntropyStats
from ._ops import cpu_isa
from .functional import cross_entropy
from .jsd import generalized_jsd, linear_generalized_jsd
from .linear import linear_cross_entropy
from .module import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["cross_entropy", "CrossEntropyLoss", "CrossEntropyStats", "linear_cross_entropy",
           "LinearCrossEntropyLoss", "generalized_jsd", "linear_generalized_jsd", "cpu_isa"]
__version__ = "0.1.0"
