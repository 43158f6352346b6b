"""Factor-pair layers equivariant to ``GL(r)``, shared by per-example gradients and LoRA adapters.

A factor pair of one layer is ``(U, V)`` with ``U: (..., c, n, r)``, ``V: (..., c, m, r)`` and the
represented matrix ``U Vᵀ`` per channel ``c``. ``GL(r)`` acts as ``(U, V) -> (U R, V R^{-ᵀ})`` and
leaves ``U Vᵀ`` unchanged. The same pair describes

* a LoRA adapter: ``U = lora_B`` (``n × r``), ``V = lora_Aᵀ`` (``m × r``);
* a per-example gradient over ``T`` tokens: ``U = Δ_bᵀ`` (``d_out × T``), ``V = A_bᵀ`` (``d_in × T``)
  (``gradient_factor_pairs``); ``r = T`` then, and any ``r`` is accepted.

Blocks: ``FactorPairLinear`` (row-side maps ``U <- W_U U``, ``V <- W_V V``, equivariant),
``GLGate`` (sign-gated nonlinearity in ``O((n+m) r)``), ``pair_product`` / ``FactorPairHead``
(invariant ``U Vᵀ``), ``singular_value_features`` (QR + small SVD), and ``FactorPairNet``
combining them for a dict of layers (``GL(r)^L``-invariant).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FactorPairLinear(nn.Module):
    """``U' = Σ_c W_U[o, c] U[c]``, ``V' = Σ_c W_V[o, c] V[c]`` (row side only), GL(r)-equivariant.

    Shapes: ``U (..., c_in, n_in, r) -> (..., c_out, n_out, r)``; ``V (..., c_in, m_in, r) ->
    (..., c_out, m_out, r)``. No bias (a bias would not transform with ``R``).
    """

    def __init__(self, n_in: int, m_in: int, n_out: int, m_out: int, c_in: int = 1, c_out: int = 1):
        super().__init__()
        self.wu = nn.Parameter(torch.randn(c_out, c_in, n_out, n_in) / math.sqrt(c_in * n_in))
        self.wv = nn.Parameter(torch.randn(c_out, c_in, m_out, m_in) / math.sqrt(c_in * m_in))

    def forward(self, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.einsum("ocij,...cjr->...oir", self.wu, U),
                torch.einsum("ocij,...cjr->...oir", self.wv, V))


class GLGate(nn.Module):
    """Gate row ``j`` of ``U`` by ``1[(U Vᵀ 1)_j > 0]`` and row ``k`` of ``V`` by ``1[(1ᵀ U Vᵀ)_k > 0]``.

    Computed as ``U (Vᵀ 1)`` and ``V (Uᵀ 1)``: ``O((n + m) r)`` per channel, never ``n × m``. Both
    gates are GL(r)-invariant, so the layer is GL(r)-equivariant.
    """

    def forward(self, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        su = (U @ V.sum(-2).unsqueeze(-1)).squeeze(-1)  # (..., c, n) = U Vᵀ 1
        sv = (V @ U.sum(-2).unsqueeze(-1)).squeeze(-1)  # (..., c, m) = (1ᵀ U Vᵀ)ᵀ
        return U * (su > 0).unsqueeze(-1).to(U), V * (sv > 0).unsqueeze(-1).to(V)


def pair_product(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Invariant ``U Vᵀ``: ``(..., n, r), (..., m, r) -> (..., n, m)``."""
    return U @ V.transpose(-1, -2)


def singular_value_features(U: torch.Tensor, V: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` singular values of ``U Vᵀ`` (zero-padded), from QR of ``U`` and ``V`` and an SVD
    of the small ``R_U R_Vᵀ``: ``O((n + m) r²)``. ``(..., n, r), (..., m, r) -> (..., k)``."""
    _, ru = torch.linalg.qr(U)
    _, rv = torch.linalg.qr(V)
    s = torch.linalg.svdvals(ru @ rv.transpose(-1, -2))
    if s.shape[-1] >= k:
        return s[..., :k]
    return F.pad(s, (0, k - s.shape[-1]))


class FactorPairHead(nn.Module):
    """Invariant head: ``U Vᵀ`` of every channel ``(c, h_n, h_m)``, flattened, then a linear map."""

    def __init__(self, c: int, h_n: int, h_m: int, out: int):
        super().__init__()
        self.lin = nn.Linear(c * h_n * h_m, out)

    def forward(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return self.lin(pair_product(U, V).flatten(-3))


class FactorPairNet(nn.Module):
    """``GL(r)^L``-invariant network on a dict of factor pairs (one per layer), any rank ``r``.

    Per layer: ``FactorPairLinear(n, m -> h, h)`` then ``depth - 1`` times (``GLGate``,
    ``FactorPairLinear``), the invariant ``U Vᵀ`` head; concatenated with the top-``k`` singular
    values of each input pair; an MLP maps everything to ``out_dim``.

    Args:
        shapes: ``{layer_name: (n, m)}`` row counts of ``U`` and ``V``.
    Input: ``{layer_name: (U (..., n, r), V (..., m, r))}`` -> ``(..., out_dim)``.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], out_dim: int = 1, hidden: int = 8,
                 channels: int = 4, depth: int = 2, svd_k: int = 4, mlp_hidden: int = 64):
        super().__init__()
        self.names, self.svd_k = list(shapes), svd_k
        self.stacks = nn.ModuleList()
        self.heads = nn.ModuleList()
        for name in self.names:
            n, m = shapes[name]
            layers = [FactorPairLinear(n, m, hidden, hidden, 1, channels)]
            layers += [FactorPairLinear(hidden, hidden, hidden, hidden, channels, channels) for _ in range(depth - 1)]
            self.stacks.append(nn.ModuleList(layers))
            self.heads.append(FactorPairHead(channels, hidden, hidden, mlp_hidden))
        self.gate = GLGate()
        d = len(self.names) * (mlp_hidden + svd_k)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(d, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, out_dim))

    def forward(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        feats = []
        for name, stack, head in zip(self.names, self.stacks, self.heads):
            if name not in pairs:
                raise KeyError(f"factor pair for layer {name!r} missing; have {list(pairs)}")
            U, V = pairs[name]
            feats.append(singular_value_features(U, V, self.svd_k))
            U, V = U.unsqueeze(-3), V.unsqueeze(-3)  # one input channel
            for k, lin in enumerate(stack):
                if k:
                    U, V = self.gate(U, V)
                U, V = lin(U, V)
            feats.append(head(U, V))
        return self.mlp(torch.cat(feats, -1))


def gradient_factor_pairs(gs, layers=None, bias: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-example gradients as factor pairs: ``{layer: (U = Δᵀ (B, d_out, T), V = Aᵀ (B, d_in[+1], T))}``.

    ``U_b V_bᵀ`` is the per-example weight gradient ``Σ_t δ_t a_tᵀ`` (with ``bias=True`` and a
    bias in the layer, ``V`` has a trailing row of ones and the last column is the bias gradient).
    Only layers with 2-D weights (Linear) are included by default.
    """
    out = {}
    for name in layers or gs.layer_names:
        f = gs[name]
        if f.module_type != "Linear":
            if layers is None:
                continue
            raise ValueError(f"layer {name!r} is a {f.module_type}; factor pairs need a Linear layer")
        a = f.activations
        if bias and "bias" in f.param_names:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)
        out[name] = (f.backprops.transpose(1, 2), a.transpose(1, 2))
    return out
