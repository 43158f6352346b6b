"""Tasks ``lopt_meta_train`` and ``lopt_eval``: meta-train and evaluate learned optimizers."""
from .tasks import lopt_eval, lopt_meta_train

__all__ = ["lopt_meta_train", "lopt_eval"]
