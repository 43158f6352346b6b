"""Choosing between model variants on a validation split: the paired one-standard-error rule."""
from __future__ import annotations

import math
from typing import Mapping

from torch import Tensor

__all__ = ["select_variant", "excess_over_best", "SELECTION_RULES"]

#: ``"min"``: the lowest mean validation loss (the earlier variant on ties); ``"one_se"``: the first
#: variant (in preference order) whose loss is within one standard error of the best one's (paired).
SELECTION_RULES = ("min", "one_se")


def excess_over_best(losses: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
    """``{variant: (mean excess, its standard error)}`` over the variant of lowest mean loss.

    ``losses``: ``{variant: (N,) per-example losses}`` on the same ``N`` rows in the same order;
    the excess of ``v`` is ``d_i = loss_v_i - loss_best_i`` (paired), its standard error
    ``std(d) / √N`` (0 when ``N = 1``); the best variant (the earliest of equal means) gets ``(0, 0)``.

    Raises:
        ValueError: no variant, or tensors of different lengths.
    """
    flat = {k: v.detach().double().flatten() for k, v in losses.items()}
    sizes = {v.numel() for v in flat.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError("select_variant: every variant needs per-example losses on the same non-empty rows, got "
                         + (", ".join(f"{k}: {v.numel()}" for k, v in flat.items()) or "no variant"))
    n = sizes.pop()
    means = {k: float(v.mean()) for k, v in flat.items()}
    best = flat[min(means, key=means.get)]
    return {k: (float((v - best).mean()), float((v - best).std()) / math.sqrt(n) if n > 1 else 0.0)
            for k, v in flat.items()}


def select_variant(losses: Mapping[str, Tensor], rule: str = "min") -> str:
    """The variant to keep, from per-example validation losses of every variant on the same rows.

    ``losses``: ``{variant: (N,) per-example losses}`` in preference order (simplest / safest
    first), every tensor over the same ``N`` validation rows in the same order. ``rule="min"``
    (the default) keeps the lowest mean loss (the earlier variant on ties). ``rule="one_se"`` is
    the one-standard-error rule: it keeps the first variant whose mean excess over the best one
    is at most its standard error (:func:`excess_over_best`) -- so a variant preferred earlier
    gives way only to one that is better by more than the noise of a small validation split.

    Raises:
        ValueError: unknown rule, no variant, or tensors of different lengths.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"select_variant: rule must be one of {SELECTION_RULES}, got {rule!r}")
    excess = excess_over_best(losses)
    if rule == "min":
        return next(k for k, (mean, _) in excess.items() if mean <= 0)
    return next(k for k, (mean, se) in excess.items() if mean <= se)
