"""gradmeta: learning on gradients and on low-rank weights.

Top level: factored per-example gradients (``collect_gradients``, ``GradientSet``) and the
torch.func reference path (``per_example_grads``); ``keep_freed_cpu_memory`` (faster training
loops on a CPU). Subpackages: ``gradmeta.data``, ``gradmeta.curvature``, ``gradmeta.models``.
"""
from . import nn
from ._runtime import keep_freed_cpu_memory
from .grads import GradientCollectionError, GradientSet, collect_gradients, per_example_grads

__version__ = "0.1.0"
__all__ = ["collect_gradients", "per_example_grads", "GradientSet", "GradientCollectionError",
           "keep_freed_cpu_memory"]
