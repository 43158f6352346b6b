"""gradmeta: learning on gradients and on low-rank weights.

Top level: factored per-example gradients (``collect_gradients``, ``GradientSet``) and the
torch.func reference path (``per_example_grads``). Subpackages: ``gradmeta.data``,
``gradmeta.curvature``, ``gradmeta.models``.
"""
from . import nn
from .grads import GradientCollectionError, GradientSet, collect_gradients, per_example_grads

__version__ = "0.1.0"
__all__ = ["collect_gradients", "per_example_grads", "GradientSet", "GradientCollectionError"]
