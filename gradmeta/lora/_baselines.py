"""Baselines on LoRA adapters, each with the symmetry it has (or lacks).

=====================  =======================================  ===========================
model                  input                                    invariant to
=====================  =======================================  ===========================
``FactorMLP``          flattened ``(U, V)``, zero-padded to r   nothing
``DenseMLP``           flattened ``ΔW = U Vᵀ``                  GL(r) (input is the product)
``SVDMLP``             top-k singular values per module (QR)    GL(r), and more
``ProcrustesMLP``      ``(U O, V O)`` aligned to a template     O(r) only
``LayerTransformer``   one token per module (flattened factors) nothing (module ids kept)
=====================  =======================================  ===========================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradmeta.nn import singular_value_features

from ._canonical import procrustes_align
from ._models import AdapterInput, AdapterModel, Pairs, mlp_head

__all__ = ["FactorMLP", "DenseMLP", "SVDMLP", "ProcrustesMLP", "LayerTransformer"]


def _pad(X: Tensor, r: int, name: str, model: str) -> Tensor:
    if X.shape[-1] > r:
        raise ValueError(f"{model}: module {name!r} has rank {X.shape[-1]} > max_rank {r} it was built for")
    return F.pad(X, (0, r - X.shape[-1]))


class FactorMLP(AdapterModel):
    """MLP on the concatenated flattened ``(U, V)`` of every module, zero-padded to ``max_rank``.

    No symmetry: a GL(r) (even a permutation of the rank columns) changes the output.
    """

    def __init__(self, shapes, out_dim: int = 1, *, max_rank: int = 16, hidden: int = 128):
        super().__init__(shapes, out_dim)
        self.kwargs.update(max_rank=max_rank, hidden=hidden)
        self.max_rank = max_rank
        self.mlp = mlp_head(max_rank * sum(n + m for n, m in self.shapes.values()), hidden, out_dim)

    def forward_pairs(self, pairs: Pairs) -> Tensor:
        name = type(self).__name__
        x = [_pad(X, self.max_rank, k, name).flatten(-2) for k in self.names for X in pairs[k]]
        return self.mlp(torch.cat(x, -1))


class DenseMLP(AdapterModel):
    """MLP on the concatenated dense ``U Vᵀ`` of every module (``Σ n·m`` inputs); GL(r)-invariant."""

    def __init__(self, shapes, out_dim: int = 1, *, hidden: int = 128):
        super().__init__(shapes, out_dim)
        self.kwargs.update(hidden=hidden)
        self.mlp = mlp_head(sum(n * m for n, m in self.shapes.values()), hidden, out_dim)

    def forward_pairs(self, pairs: Pairs) -> Tensor:
        return self.mlp(torch.cat([(U @ V.transpose(-1, -2)).flatten(-2) for U, V in pairs.values()], -1))


class SVDMLP(AdapterModel):
    """MLP on the top-``k`` singular values of every module's ``U Vᵀ`` (QR route, ``O((n+m) r²)``)."""

    def __init__(self, shapes, out_dim: int = 1, *, k: int = 16, hidden: int = 128):
        super().__init__(shapes, out_dim)
        self.kwargs.update(k=k, hidden=hidden)
        self.k = k
        self.mlp = mlp_head(k * len(self.names), hidden, out_dim)

    def forward_pairs(self, pairs: Pairs) -> Tensor:
        return self.mlp(torch.cat([singular_value_features(U, V, self.k) for U, V in pairs.values()], -1))


class ProcrustesMLP(FactorMLP):
    """:class:`FactorMLP` after aligning each module's ``U`` to a template by orthogonal Procrustes.

    Call :meth:`fit_template` (with one adapter or a list; the first one is the template) before
    use. Invariant to ``O(r)`` acting on the rank columns; a general ``R ∈ GL(r)`` changes the output.
    The alignment is unique only when ``Uᵀ U_template`` has full rank (ranks equal the template's
    and ``r ≤ n``); zero-padded or rank-deficient factors leave part of the rotation arbitrary.
    """

    def __init__(self, shapes, out_dim: int = 1, *, max_rank: int = 16, hidden: int = 128):
        super().__init__(shapes, out_dim, max_rank=max_rank, hidden=hidden)
        for i, (n, _) in enumerate(self.shapes.values()):
            self.register_buffer(f"template_{i}", torch.zeros(n, max_rank))
        self.register_buffer("has_template", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit_template(self, x: AdapterInput) -> "ProcrustesMLP":
        """Use the (input-scaled, zero-padded) ``U`` of the first given adapter as the template."""
        pairs = self.pairs(x)
        for i, k in enumerate(self.names):
            getattr(self, f"template_{i}").copy_(_pad(pairs[k][0][0], self.max_rank, k, "ProcrustesMLP"))
        self.has_template.fill_(True)
        return self

    def forward_pairs(self, pairs: Pairs) -> Tensor:
        if not bool(self.has_template):
            raise RuntimeError("ProcrustesMLP: call fit_template(adapters) before using the model")
        aligned = {}
        for i, k in enumerate(self.names):
            U, V = (_pad(X, self.max_rank, k, "ProcrustesMLP") for X in pairs[k])
            aligned[k] = procrustes_align(U, V, getattr(self, f"template_{i}"))
        return super().forward_pairs(aligned)


class LayerTransformer(AdapterModel):
    """Transformer encoder over one token per module: a per-module linear embedding of the flattened,
    zero-padded ``(U, V)`` plus a learned module embedding; mean-pooled, then a linear head."""

    def __init__(self, shapes, out_dim: int = 1, *, max_rank: int = 16, d_model: int = 64, n_heads: int = 4,
                 n_layers: int = 2):
        super().__init__(shapes, out_dim)
        self.kwargs.update(max_rank=max_rank, d_model=d_model, n_heads=n_heads, n_layers=n_layers)
        self.max_rank = max_rank
        self.embed = nn.ModuleList(nn.Linear(max_rank * (n + m), d_model) for n, m in self.shapes.values())
        self.pos = nn.Parameter(torch.randn(len(self.names), d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, out_dim)

    def forward_pairs(self, pairs: Pairs) -> Tensor:
        tokens = [emb(torch.cat([_pad(X, self.max_rank, k, "LayerTransformer").flatten(-2) for X in pairs[k]], -1))
                  for emb, k in zip(self.embed, self.names)]
        h = self.encoder(torch.stack(tokens, -2) + self.pos)
        return self.head(h.mean(-2))
