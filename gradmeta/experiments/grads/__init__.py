"""Task ``gradients_digits``: gradient statistics collected along the training of a digits MLP."""
from .gradients import gradient_statistics, gradients_digits

__all__ = ["gradients_digits", "gradient_statistics"]
