"""Task ``nn_capability``: GradMetaNet vs averaged-gradient baselines on targets that need products."""
from .capability import nn_capability

__all__ = ["nn_capability"]
