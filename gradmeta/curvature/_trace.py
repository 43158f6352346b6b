"""Exact and low-variance Fisher traces of classifiers from factored gradients."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..grads import GradientSet, collect_gradients

__all__ = ["fisher_trace", "standard_trace", "rao_blackwell_trace"]


def fisher_trace(model: nn.Module, inputs: Tensor) -> Tensor:
    """Exact true-Fisher trace ``(1/N) Σ_n Σ_y p(y|x_n) ‖∇_θ log p(y|x_n)‖²`` of a classifier.

    ``inputs (N, d)``; ``model`` maps them to logits ``(N, C)``. Labels are summed out exactly (one
    gradient collection on the ``N · C`` (point, label) pairs). Returns a 0-d tensor.
    """
    with torch.no_grad():
        probs = model(inputs).softmax(-1)  # (N, C)
    n, c = probs.shape
    gs = collect_gradients(model, lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
                           inputs.repeat_interleave(c, 0), torch.arange(c, device=inputs.device).repeat(n))
    return (probs * gs.grad_norms().square().view(n, c)).sum(1).mean()


def standard_trace(gs: GradientSet) -> Tensor:
    """The standard estimator ``(1/B) Σ_b ‖g_b‖²`` from a gradient set (0-d tensor)."""
    return gs.grad_norms().square().mean()


def rao_blackwell_trace(gs: GradientSet, layer: str | None = None) -> Tensor:
    """Reference (not learned): the standard estimator with the sampled label summed out exactly in
    the last layer's term (a 0-d tensor).

    For softmax cross-entropy the last layer's backprop is ``δ_b = p_b − e_{y_b}``, so the set
    itself reveals ``p_b = δ_b + e_{argmin δ_b}``, and that layer's part of ``‖g_b‖²``,
    ``‖δ_b‖² (‖a_b‖² + 1)`` (bias included), has the exact expectation over ``y ~ p_b``
    ``(1 − ‖p_b‖²)(‖a_b‖² + 1)``. Replacing it gives an estimator that is still unbiased for the
    true Fisher trace with less label noise; the other layers keep their one-sample terms.
    Needs a ``Linear`` last layer (``layer``; default the last in the set) and one token per datum.
    """
    layer = gs.layer_names[-1] if layer is None else layer
    f = gs[layer]
    if f.module_type != "Linear" or f.backprops.shape[1] != 1:
        raise ValueError(f"rao_blackwell_trace: {layer!r} must be a Linear layer with one token per datum "
                         f"(got {f.module_type}, backprops {tuple(f.backprops.shape)})")
    d, a = f.backprops[:, 0], f.activations[:, 0]
    p = d + torch.nn.functional.one_hot(d.argmin(-1), d.shape[-1]).to(d)
    a_sq = a.square().sum(-1) + float("bias" in f.param_names)
    last = gs.layer_grad_norms()[layer].square()
    return (gs.grad_norms().square() - last + a_sq * (1 - p.square().sum(-1))).mean()
