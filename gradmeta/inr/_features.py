"""What an editor sees of an INR besides its weights: its gradient set, or probing activations.

* gradient set: the per-coordinate squared error ``ℓ_p = ‖f(x_p) − t_p‖²`` at 64 fixed random
  coordinates ``x_p``, factored by ``gm.collect_gradients`` over the SIREN's three Linear layers.
  The default target is ``t = 0``: a well-fitted INR has almost no residual on its own image, so
  the error against the image carries little signal, while against 0 the backprops
  ``δ = 2 f(x) ∂f/∂z`` carry the output and its Jacobian at every probed point.
* probing set (baseline): the activations at grid points, in the same per-layer layout
  (``activations`` = layer inputs, ``backprops`` slot = the layer's pre-activations ``ω₀ z``, or
  the output for the last layer), so one GradMetaNet architecture reads either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from ..grads import GradientSet, collect_gradients
from ._siren import DEFAULT_OMEGA0, Siren, pixel_grid

__all__ = ["probe_coordinates", "inr_gradient_set", "ProbeSet", "ProbeFactors", "FeatureSet", "gradient_factor_sets",
           "probe_factor_sets", "factor_rms", "rescale_sets"]


def probe_coordinates(n: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(n, 2)`` fixed random coordinates, uniform in ``[-1, 1]²`` (the same for every INR)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def _sq_error(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).square().sum(-1)


def inr_gradient_set(inr: Siren, coords: Tensor, targets: Tensor | None = None) -> GradientSet:
    """Gradient set of one INR: per-coordinate squared errors ``(B,)`` at ``coords (B, 2)``.

    ``targets (B, C)`` defaults to zeros. The result's ``layers.i`` factors are ``A (B, 1, d_in)``
    and ``Δ (B, 1, d_out)``; ``per_example_grads()`` equals the gradient of each ``ℓ_p`` alone.
    """
    C = inr.layers[-1].out_features
    coords = coords.to(inr.layers[0].weight)
    if targets is None:
        targets = coords.new_zeros(coords.shape[0], C)
    return collect_gradients(inr, _sq_error, coords, targets)


@dataclass(frozen=True)
class ProbeFactors:
    """One layer of a :class:`ProbeSet`: ``activations (P, 1, d_in)``, ``backprops (P, 1, d_out)``."""

    activations: Tensor
    backprops: Tensor


class ProbeSet:
    """Probing activations of one INR, laid out like a ``GradientSet`` so GradMetaNet reads either.

    Layer ``k``: ``self[k].activations`` = its inputs at the probe points, ``self[k].backprops`` =
    its pre-activations (not a gradient, so this is deliberately *not* a ``GradientSet``: it has
    none of the gradient methods). Holds only what GradMetaNet reads: ``layer_names``,
    ``batch_size``, indexing and ``map_factors`` (same contract as ``GradientSet.map_factors``).
    """

    def __init__(self, layers: dict[str, ProbeFactors]):
        self._layers = dict(layers)

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    @property
    def batch_size(self) -> int:
        return next(iter(self._layers.values())).activations.shape[0]

    def __getitem__(self, name: str) -> ProbeFactors:
        return self._layers[name]

    def __contains__(self, name: str) -> bool:
        return name in self._layers

    def map_factors(self, fn: Callable[[str, Tensor, Tensor], tuple[Tensor, Tensor]]) -> "ProbeSet":
        """A new set whose layer ``name`` holds ``fn(name, activations, backprops)``."""
        return ProbeSet({k: ProbeFactors(*fn(k, f.activations, f.backprops)) for k, f in self._layers.items()})


FeatureSet = Union[GradientSet, ProbeSet]


def rescale_sets(sets: list[FeatureSet], scales: dict[str, tuple[float, float]]) -> list[FeatureSet]:
    """Layer ``k``'s ``A`` divided by ``scales[k][0]`` and ``Δ`` by ``scales[k][1]`` (via ``map_factors``).

    A positive scalar per layer commutes with every neuron permutation, so symmetries are kept.
    """
    return [s.map_factors(lambda k, a, d: (a / scales[k][0], d / scales[k][1])) for s in sets]


def gradient_factor_sets(params: dict[str, Tensor], coords: Tensor, omega0: float = DEFAULT_OMEGA0,
                         target: float = 0.0) -> list[GradientSet]:
    """Gradient sets (:func:`inr_gradient_set`) of a stack of INRs ``{name: (G, ...)}``.

    ``target``: the constant ``t`` of ``ℓ_p = ‖f(x_p) − t‖²``. With ``t = 0`` the backprops
    ``2 f ∂f/∂z`` vanish wherever the image is black (``f ≈ 0``); a ``t`` outside the image's
    range (e.g. ``-1`` for images in ``[0, 1]``) keeps ``∂f/∂z`` visible at every point.
    """
    G = params["layers.0.weight"].shape[0]
    out = []
    for g in range(G):
        inr = Siren.from_params({k: v[g].detach() for k, v in params.items()}, omega0)
        C = inr.layers[-1].out_features
        out.append(inr_gradient_set(inr, coords, coords.new_full((coords.shape[0], C), target) if target else None))
    return out


def probe_factor_sets(params: dict[str, Tensor], grid: int = 8, omega0: float = DEFAULT_OMEGA0) -> list[ProbeSet]:
    """Probing sets of a stack of INRs: activations at the ``grid × grid`` pixel-centre points.

    Layer ``i``: ``activations`` = its input ``(P, 1, d_in)``, ``backprops`` slot = its
    pre-activation ``ω₀ z`` (the sine's argument; the raw output for the last layer).
    Differentiable in ``params`` (computed batched over the stack).
    """
    w0 = params["layers.0.weight"]
    x = pixel_grid(grid, grid, w0.dtype).to(w0.device).expand(w0.shape[0], -1, -1)  # (G, P, 2)
    n = len(params) // 2
    per_layer = {}
    for i in range(n):
        w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
        z = torch.matmul(x, w.transpose(-1, -2)) + b.unsqueeze(-2)
        pre = omega0 * z if i < n - 1 else z
        per_layer[f"layers.{i}"] = (x, pre)
        x = torch.sin(pre)
    G = w0.shape[0]
    return [ProbeSet({k: ProbeFactors(a[g].unsqueeze(1), d[g].unsqueeze(1)) for k, (a, d) in per_layer.items()})
            for g in range(G)]


def factor_rms(sets: list[FeatureSet]) -> dict[str, tuple[float, float]]:
    """Per layer ``(rms A, rms Δ)`` over a list of factor sets (for :func:`rescale_sets`)."""
    out = {}
    for k in sets[0].layer_names:
        a = torch.stack([s[k].activations for s in sets])
        d = torch.stack([s[k].backprops for s in sets])
        out[k] = (float(a.square().mean().sqrt().clamp_min(1e-12)), float(d.square().mean().sqrt().clamp_min(1e-12)))
    return out
