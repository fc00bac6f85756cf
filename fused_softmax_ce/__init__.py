"""Fused softmax cross-entropy for PyTorch, a drop-in for `F.cross_entropy`."""
from .functional import CrossEntropyStats, cross_entropy
from .module import CrossEntropyLoss

__all__ = ["cross_entropy", "CrossEntropyLoss", "CrossEntropyStats"]
__version__ = "0.1.0"
