"""Task ``inr_editing``: fit a SIREN zoo, train editors, compare held-out pixel MSE."""
from .tasks import inr_editing

__all__ = ["inr_editing"]
