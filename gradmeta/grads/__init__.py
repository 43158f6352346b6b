"""Factored per-example gradients.

``collect_gradients`` (hooks path) keeps, for every supported layer, the inputs ``A`` and the
output gradients ``Δ`` of one forward+backward (every other trainable parameter takes an exact
fallback); ``functional_factors`` computes the same from a pure function of a parameter dict (usable
under ``torch.func.vmap``); ``per_example_grads`` (torch.func path) returns full per-example
gradients of any module.
"""
from ._collect import collect_gradients
from ._errors import GradientCollectionError
from ._factors import LayerFactors
from ._func import per_example_grads
from ._functional import functional_factors
from ._losses import causal_lm_losses, sequence_classification_losses
from ._rules import FactorRule, register_rule, support_table, supported_layers
from ._set import GradientSet

__all__ = ["collect_gradients", "functional_factors", "per_example_grads", "GradientSet", "LayerFactors",
           "GradientCollectionError", "causal_lm_losses",
           "sequence_classification_losses", "FactorRule", "register_rule", "supported_layers", "support_table"]
