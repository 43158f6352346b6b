"""``GradientSet``: the factored per-example gradients of a batch, and what follows from them."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from ._factors import LayerFactors


class GradientSet:
    """Per-example gradients of a batch of ``B`` examples, kept as factors per layer.

    Returned by ``gm.collect_gradients``. Indexing by module name gives a ``LayerFactors`` with
    ``.activations (B, T, d_in)`` and ``.backprops (B, T, d_out)``. Every method below works from
    the factors; only ``per_example_grads`` returns tensors of size ``B × parameters``. Parameter
    dicts are keyed by ``model.named_parameters()`` names. The examples are unordered: permuting
    them permutes every output along its batch axis.
    """

    def __init__(self, layers: dict[str, LayerFactors], losses: torch.Tensor):
        self._layers = dict(layers)
        self.losses = losses
        """``(B,)`` per-example losses of the batch (detached)."""

    @property
    def layer_names(self) -> list[str]:
        """Names of the collected modules, in forward order."""
        return list(self._layers)

    @property
    def batch_size(self) -> int:
        """Number of examples ``B``."""
        return self.losses.shape[0]

    @property
    def param_names(self) -> list[str]:
        """Names of the collected parameters, in layer order."""
        return [n for f in self._layers.values() for n in f.param_names.values()]

    def __getitem__(self, name: str) -> LayerFactors:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"no layer {name!r} in this GradientSet; layers: {self.layer_names}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._layers

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        rows = ", ".join(f"{n}: {f.module_type} T={f.backprops.shape[1]}" for n, f in self._layers.items())
        return f"GradientSet(B={self.batch_size}, layers=[{rows}])"

    def map_factors(self, fn: Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                    ) -> "GradientSet":
        """A new set whose layer ``name`` has factors ``fn(name, A, Δ) -> (A', Δ')``.

        ``A (B, T, d_in)`` and ``Δ (B, T, d_out)`` are :attr:`LayerFactors.activations` and
        ``.backprops``; the results must keep those shapes. Every method of the new set then works
        on the transformed factors (e.g. per-layer rescaling: ``fn = lambda n, a, d: (a / s_a, d / s_d)``,
        which scales each per-example weight gradient by ``1 / (s_a s_d)``). Only layers whose
        factors are dense inputs (Linear, convolutions, LayerNorm) can be mapped; an Embedding,
        whose ``A`` is one-hot rows stored as indices, raises ``ValueError`` naming the layer.
        """
        layers = {}
        for name, f in self._layers.items():
            if not getattr(f._rule, "dense_inputs", False):
                raise ValueError(f"map_factors: layer {name!r} ({f.module_type}) stores its activations as "
                                 "indices and cannot be mapped; restrict the set to the other layers")
            a, d = fn(name, f.activations, f.backprops)
            if a.shape != f.activations.shape or d.shape != f.backprops.shape:
                raise ValueError(f"map_factors: fn changed the shapes of layer {name!r}: A {tuple(f.activations.shape)}"
                                 f" -> {tuple(a.shape)}, Δ {tuple(f.backprops.shape)} -> {tuple(d.shape)}")
            layers[name] = dataclasses.replace(f, _inputs=a, backprops=d)
        return GradientSet(layers, self.losses)

    def _per_param(self, method: str) -> dict[str, torch.Tensor]:
        out = {}
        for f in self._layers.values():
            for local, g in getattr(f._rule, method)(f).items():
                out[f.param_names[local]] = g
        return out

    def per_example_grads(self) -> dict[str, torch.Tensor]:
        """``{param_name: (B, *param.shape)}``: materialised per-example gradients."""
        return self._per_param("per_example")

    def mean_grad(self) -> dict[str, torch.Tensor]:
        """``{param_name: param.shape}``: gradient of ``losses.mean()``."""
        return self._per_param("mean")

    def grad_norms(self) -> torch.Tensor:
        """``(B,)`` L2 norms of the per-example gradients over all collected parameters."""
        return sum(f._rule.sq_norms(f) for f in self._layers.values()).sqrt()

    def layer_grad_norms(self) -> dict[str, torch.Tensor]:
        """``{layer_name: (B,)}`` per-example gradient norms of each layer's parameters."""
        return {n: f._rule.sq_norms(f).sqrt() for n, f in self._layers.items()}

    def gram(self) -> torch.Tensor:
        """``(B, B)`` Gram matrix ``⟨g_b, g_c⟩`` of per-example gradients, summed over layers."""
        return sum(f._rule.gram(f) for f in self._layers.values())

    def fisher_diagonal(self) -> dict[str, torch.Tensor]:
        """``{param_name: param.shape}``: empirical Fisher diagonal ``(1/B) Σ_b g_b ∘ g_b``."""
        return {k: v / self.batch_size for k, v in self._per_param("sq_sum").items()}

    def kfac_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer_name: (A_cov, G_cov)}`` for Linear, convolution and Embedding layers.

        ``A_cov = (1/(B·T)) Σ_{b,t} a aᵀ`` (``a`` with a trailing 1 when the layer has a bias) and
        ``G_cov = (1/B) Σ_{b,t} δ δᵀ``; for ``T = 1``, ``A_cov ⊗ G_cov`` is the K-FAC approximation
        of the empirical Fisher ``(1/B) Σ_b vec(g_b) vec(g_b)ᵀ`` (weights in ``(d_out, d_in)`` layout).
        """
        return {n: f._rule.kfac(f) for n, f in self._layers.items() if f._rule.has_kfac}
