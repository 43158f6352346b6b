"""Factored per-example gradients of one layer: the container and the shared linear-algebra.

All formulas work on the *bilinear* form of a layer: per example ``b`` its weight gradient is
``G_b = Σ_t δ_{b,t} a_{b,t}ᵀ`` (``d_out × d_in``). A bias is handled by appending a constant 1 to
every ``a`` (its gradient is ``Σ_t δ_{b,t}``), so one code path serves both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Chunks of materialised per-example gradients are kept below this many elements.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class LayerFactors:
    """Factors of one layer for a batch of ``B`` examples of ``T`` tokens each.

    Attributes:
        module_type: class name of the module, e.g. ``"Linear"``.
        param_names: ``{"weight": "<model.named_parameters() name>", "bias": ...}`` for the
            trainable parameters of the module.
        backprops: ``Δ`` of shape ``(B, T, d_out)``: the gradient of example ``b``'s own loss with
            respect to the layer output (not divided by ``B``).
    """

    module_type: str
    param_names: dict[str, str]
    param_shapes: dict[str, torch.Size]
    backprops: torch.Tensor
    _inputs: torch.Tensor = field(repr=False)
    _rule: object = field(repr=False)

    @property
    def activations(self) -> torch.Tensor:
        """``A`` of shape ``(B, T, d_in)``: the layer input of every token (one-hot rows for an
        embedding, unfolded patches for a convolution, the normalised input for a LayerNorm)."""
        return self._rule.activations(self)

    @property
    def batch_size(self) -> int:
        return self.backprops.shape[0]


def append_one(a: torch.Tensor) -> torch.Tensor:
    """``(B, T, d) -> (B, T, d + 1)`` with a trailing 1 (the bias input)."""
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


def bilinear_per_example(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(B, T, i), (B, T, o) -> (B, o, i)``: ``Σ_t δ_t a_tᵀ`` per example."""
    return torch.einsum("bto,bti->boi", d, a)


def bilinear_gram(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` inner products ``⟨G_b, G_c⟩ = Σ_{t,s} (δ_bt·δ_cs)(a_bt·a_cs)``.

    Uses the factored form when it is cheaper than materialising ``G_b`` (it is for ``T = 1``),
    otherwise chunked per-example gradients; both are exact.
    """
    B, T, i = a.shape
    o = d.shape[-1]
    if T * T * (i + o) <= i * o:
        if T == 1:
            return (d[:, 0] @ d[:, 0].T) * (a[:, 0] @ a[:, 0].T)
        return (torch.einsum("bto,cso->btcs", d, d) * torch.einsum("bti,csi->btcs", a, a)).sum((1, 3))
    g = bilinear_per_example(a, d).reshape(B, -1)
    return g @ g.T


def bilinear_sq_norms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(B,)`` squared norms ``‖G_b‖² = Σ_{t,s} (δ_t·δ_s)(a_t·a_s)``, chunked over examples."""
    B, T, i = a.shape
    o = d.shape[-1]
    if T * (i + o) <= i * o:
        if T == 1:
            return (d[:, 0] ** 2).sum(-1) * (a[:, 0] ** 2).sum(-1)
        return (torch.einsum("bto,bso->bts", d, d) * torch.einsum("bti,bsi->bts", a, a)).sum((1, 2))
    return torch.cat([(g ** 2).sum((1, 2)) for g in _chunked_per_example(a, d)])


def bilinear_sq_sum(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(o, i)``: ``Σ_b G_b ∘ G_b``; one matmul when ``T = 1``, else chunked over examples."""
    if a.shape[1] == 1:
        return (d[:, 0] ** 2).T @ (a[:, 0] ** 2)
    return sum((g ** 2).sum(0) for g in _chunked_per_example(a, d))


def _chunked_per_example(a: torch.Tensor, d: torch.Tensor):
    B, _, i = a.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, i * d.shape[-1]))
    for start in range(0, B, step):
        yield bilinear_per_example(a[start:start + step], d[start:start + step])


def split_bias(g: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split ``(..., o, i [+1])`` into the weight part and the bias column."""
    if has_bias:
        return g[..., :-1], g[..., -1]
    return g, None
