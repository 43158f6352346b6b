"""Experiments runnable with ``gradmeta run tasks/<spec>.toml``.

Importing this package registers its tasks in :data:`gradmeta.run.TASKS`:

* ``gradients_digits`` -- an MLP trained on the scikit-learn digits while gradient sets are
  collected along training: per-layer gradient norms, gradient-noise scale and the empirical
  Fisher-diagonal spectrum (:mod:`gradmeta.experiments.gradients`).
"""
from .gradients import gradient_statistics, gradients_digits

__all__ = ["gradients_digits", "gradient_statistics"]
