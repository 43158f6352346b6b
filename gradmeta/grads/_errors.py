"""Errors raised while collecting gradients."""


class GradientCollectionError(RuntimeError):
    """A model, module or loss cannot give correct per-example gradients; the message says which and why."""
