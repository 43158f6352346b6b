"""Tasks ``lopt_meta_train``, ``lopt_eval`` and ``lopt_table``: meta-train and evaluate learned optimizers."""
from .table import lopt_table
from .tasks import lopt_eval, lopt_meta_train

__all__ = ["lopt_meta_train", "lopt_eval", "lopt_table"]
