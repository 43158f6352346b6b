"""Factor rules: how each supported module class yields and uses its factors.

A rule captures the layer input in a forward hook and the output gradient in the backward pass,
and turns the pair into per-example gradients, mean gradients, Gram matrices, squared sums and
K-FAC factors. Rules are registered per module class (``register_rule``); the README's support
table is generated from this registry (``supported_layers``).
"""
from __future__ import annotations

import re

import torch
from torch import nn
from ._errors import GradientCollectionError
from ._factors import (LayerFactors, append_one, bilinear_gram, bilinear_per_example,
                       bilinear_sq_norms, bilinear_sq_sum, split_bias)

_REGISTRY: dict[type[nn.Module], "FactorRule"] = {}
# Rules for classes of optional packages, matched by ``module.qualname`` or a class-name pattern
# (so ``transformers`` is never imported here): ``(label, pattern, rule)``.
_NAMED: list[tuple[str, "re.Pattern[str]", "FactorRule"]] = []


def register_rule(module_cls: "type[nn.Module] | str", label: str | None = None):
    """Class decorator: register a rule for ``module_cls`` (and subclasses that keep its forward).

    ``module_cls`` may also be a regular expression matched (``fullmatch``) against
    ``f"{cls.__module__}.{cls.__qualname__}"`` of a module's class, for classes of packages that
    gradmeta does not import (e.g. ``r"transformers\\.pytorch_utils\\.Conv1D"``); ``label`` names it in
    the support table.
    """
    def wrap(rule_cls):
        if isinstance(module_cls, str):
            _NAMED.append((label or module_cls, re.compile(module_cls), rule_cls()))
        else:
            _REGISTRY[module_cls] = rule_cls()
        return rule_cls
    return wrap


def rule_for(module: nn.Module) -> "FactorRule | None":
    """The rule for ``module``: its class or the nearest registered base whose ``forward`` it keeps,
    else the first name pattern matching its class."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls] if type(module).forward is cls.forward else None
    cls = type(module)
    qual = f"{cls.__module__}.{cls.__qualname__}"
    for _, pattern, rule in _NAMED:
        if pattern.fullmatch(qual):
            return rule
    return None


def supported_layers() -> dict[str, str]:
    """``{layer: what the factors are}`` for every registered rule (classes, then name patterns)."""
    out = {f"nn.{cls.__name__}": rule.summary for cls, rule in _REGISTRY.items()}
    out.update({label: rule.summary for label, _, rule in _NAMED})
    return out


def support_table() -> str:
    """Markdown table of the supported layers (the README's table is this text)."""
    rows = [f"| `{name}` | {summary} |" for name, summary in supported_layers().items()]
    rows.append("| any other trainable parameter | exact fallback: per-example gradients `(B, *shape)` "
                "from one batched backward (listed in `GradientSet.fallback_params`) |")
    return "\n".join(["| layer | factors kept per example |", "|---|---|", *rows])


class FactorRule:
    """Base rule: everything derived from materialised per-example gradients of the layer.

    Subclasses implement ``capture``, ``backprop``, ``activations`` and ``per_example``; layers whose
    per-example gradients are as small as their factors (norm layers) need nothing more.
    """

    summary = ""
    has_kfac = False
    #: ``activations`` are the stored inputs themselves (so ``GradientSet.map_factors`` may replace them).
    dense_inputs = True
    #: The module's parameters are used functionally inside its forward, so module hooks cannot see
    #: them: during capture the hook recomputes the call through ``forward_again`` (same function,
    #: in a form whose intermediate tensors are recorded) and the model continues with its result.
    replaces_forward = False
    #: Names of child modules whose parameters this module uses functionally (their own hooks never
    #: fire; ``forward_again`` records their calls under the child's name).
    owned_children: tuple[str, ...] = ()

    def forward_again(self, session, name: str, module: nn.Module, args: tuple, kwargs: dict):
        """Recompute ``module(*args, **kwargs)``, recording factored calls with ``session.record``;
        returns the output the model continues with."""
        raise NotImplementedError

    def check(self, module: nn.Module, name: str) -> None:
        """Raise ``GradientCollectionError`` if this module's configuration can give no correct
        per-example gradient at all (e.g. it changes its weight during the forward pass)."""

    def covers(self, module: nn.Module) -> str | None:
        """``None`` if the rule factors this module, else why not (its parameters then go to the
        exact fallback)."""
        return None

    def verify(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor, name: str) -> None:
        """Optional check, at capture time, that the module computes what the rule assumes."""

    def capture(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Layer input ``x`` (batch-first) -> what is stored, batch-first."""
        raise NotImplementedError

    def backprop(self, module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
        """Gradient at the layer output -> ``Δ`` of shape ``(B, T, d_out)``."""
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    def finish(self, module: nn.Module, stored: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Last adjustment of ``Δ`` given the stored input (e.g. no gradient at padding tokens)."""
        return d

    def activations(self, f: LayerFactors) -> torch.Tensor:
        return f._inputs

    def per_example(self, f: LayerFactors) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _flat(self, f: LayerFactors) -> torch.Tensor:
        return torch.cat([g.flatten(1) for g in self.per_example(f).values()], dim=1)

    def mean(self, f: LayerFactors) -> dict[str, torch.Tensor]:
        return {k: g.mean(0) for k, g in self.per_example(f).items()}

    def gram(self, f: LayerFactors) -> torch.Tensor:
        g = self._flat(f)
        return g @ g.T

    def sq_norms(self, f: LayerFactors) -> torch.Tensor:
        return (self._flat(f) ** 2).sum(1)

    def sq_sum(self, f: LayerFactors) -> dict[str, torch.Tensor]:
        return {k: (g ** 2).sum(0) for k, g in self.per_example(f).items()}

    def kfac_ok(self, f: LayerFactors) -> bool:
        return self.has_kfac

    def kfac(self, f: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
        raise GradientCollectionError(f"K-FAC factors are not defined for {f.module_type} layers")


class BilinearRule(FactorRule):
    """Layers whose weight gradient is ``Σ_t δ_t a_tᵀ`` (Linear, convolutions): factored formulas."""

    has_kfac = True

    def _pair(self, f: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
        a = f._inputs
        return (append_one(a) if "bias" in f.param_shapes else a), f.backprops

    def _weight(self, f: LayerFactors, w: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        return w.reshape(lead + f.param_shapes["weight"])

    def _to_params(self, f: LayerFactors, g: torch.Tensor, lead: tuple[int, ...]) -> dict[str, torch.Tensor]:
        w, b = split_bias(g, "bias" in f.param_shapes)
        out = {"weight": self._weight(f, w, lead)}
        if b is not None:
            out["bias"] = b
        return {k: v for k, v in out.items() if k in f.param_names}

    def per_example(self, f):
        return self._to_params(f, bilinear_per_example(*self._pair(f)), (f.batch_size,))

    def mean(self, f):
        a, d = self._pair(f)
        return self._to_params(f, torch.einsum("bto,bti->oi", d, a) / f.batch_size, ())

    def gram(self, f):
        return bilinear_gram(*self._masked_pair(f))

    def sq_norms(self, f):
        return bilinear_sq_norms(*self._masked_pair(f))

    def sq_sum(self, f):
        return self._to_params(f, bilinear_sq_sum(*self._pair(f)), ())

    def _masked_pair(self, f):
        # A frozen weight (or bias) must not count in norms: drop its part of the factors.
        a, d = self._pair(f)
        if "weight" not in f.param_names:
            a = a[..., -1:]
        elif "bias" in f.param_shapes and "bias" not in f.param_names:
            a = a[..., :-1]
        return a, d

    def kfac(self, f):
        a, d = self._pair(f)
        B, T = d.shape[:2]
        a_cov = torch.einsum("bti,btj->ij", a, a) / (B * T)
        g_cov = torch.einsum("bto,btp->op", d, d) / B
        return a_cov, g_cov


class DenseRule(FactorRule):
    """The exact fallback: per-example gradients ``(B, *shape)`` kept as they are (no factors)."""

    summary = "per-example gradients `(B, *shape)`"
    dense_inputs = False

    def activations(self, f: LayerFactors) -> torch.Tensor:
        raise GradientCollectionError(
            f"parameter {list(f.param_names.values())} came through the exact fallback and has no "
            "factors; use per_example_grads() or the norms instead")

    def per_example(self, f: LayerFactors) -> dict[str, torch.Tensor]:
        return {k: f.backprops for k in f.param_names}


# Concrete layer rules register themselves on import.
from . import _layer_rules  # noqa: E402,F401,I001
from . import _attention_rule  # noqa: E402,F401
