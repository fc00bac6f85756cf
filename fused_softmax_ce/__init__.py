"""Fused softmax cross-entropy for PyTorch, a drop-in for `F.cross_entropy`."""
from .functional import cross_entropy
from .module import CrossEntropyLoss
from .linear import LinearCrossEntropyLoss, linear_cross_entropy

__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss"]
__version__ = "0.1.0"
