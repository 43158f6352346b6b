"""Canonical forms and group actions on LoRA factors: sign-fixed SVD form, Procrustes, random GL(r)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._adapter import Adapter, LoraFactors

__all__ = ["canonical_svd", "canonical_adapter", "procrustes_align", "random_gl"]


def canonical_svd(U: Tensor, V: Tensor, scale: float | Tensor = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Sign-fixed SVD of ``scale · U Vᵀ`` through QR, without forming the ``n × m`` matrix.

    ``U = Q_U R_U``, ``V = Q_V R_V``, ``R_U R_Vᵀ = a diag(σ) bᵀ``; then ``P = Q_U a``, ``Q = Q_V b``.
    Each singular pair's sign is fixed so that the largest-magnitude entry of ``P[:, i]`` is
    positive. The result depends on ``U Vᵀ`` only (GL(r)-invariant) when the nonzero singular
    values are distinct. Cost ``O((n + m) r²)``.

    Args:
        U: ``(..., n, r)``; V: ``(..., m, r)``; scale: scalar (or broadcastable to ``(...)``).

    Returns:
        ``P (..., n, k)``, ``σ (..., k)`` (descending), ``Q (..., m, k)`` with ``k = min(n, m, r)`` and
        ``P diag(σ) Qᵀ = scale · U Vᵀ``.
    """
    qu, ru = torch.linalg.qr(U)
    qv, rv = torch.linalg.qr(V)
    scale = torch.as_tensor(scale, dtype=U.dtype)
    a, s, bh = torch.linalg.svd(scale[..., None, None] * (ru @ rv.transpose(-1, -2)), full_matrices=False)
    P, Q = qu @ a, qv @ bh.transpose(-1, -2)
    idx = P.abs().argmax(dim=-2, keepdim=True)  # (..., 1, r)
    sign = torch.sign(torch.gather(P, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return P * sign, s, Q * sign


def canonical_adapter(ad: Adapter) -> Adapter:
    """Every module in canonical SVD form: ``U = P √σ``, ``V = Q √σ``, ``scale = 1`` (same deltas),
    zero-padded back to the module's rank when ``min(n, m) < r``."""
    def one(_, f: LoraFactors) -> LoraFactors:
        P, s, Q = canonical_svd(f.U, f.V, f.scale)
        r = s.sqrt()
        out = LoraFactors(P * r, Q * r, 1.0, f.weight_shape, f.kind, f.fan_in_fan_out)
        return out.pad_rank(f.rank)
    return ad.map(one)


def procrustes_align(U: Tensor, V: Tensor, U_ref: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ``(U, V)`` by the orthogonal ``O`` minimising ``‖U O − U_ref‖_F`` (orthogonal Procrustes).

    ``O = W Zᵀ`` from the SVD ``Uᵀ U_ref = W S Zᵀ``; returns ``(U O, V O)`` (``O⁻ᵀ = O``), so
    ``U Vᵀ`` is unchanged. Invariant to ``U → U O'`` for orthogonal ``O'`` only, not to all of GL(r).

    Shapes: ``U (..., n, r)``, ``V (..., m, r)``, ``U_ref (n, r)`` or ``(..., n, r)``.
    """
    W, _, Zh = torch.linalg.svd(U.transpose(-1, -2) @ U_ref)
    O = W @ Zh
    return U @ O, V @ O


def random_gl(r: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
              cond: float = 10.0) -> Tensor:
    """A random ``R ∈ GL(r)`` with condition number ``cond``: ``Q₁ diag(logspace) Q₂`` (orthogonal Q's)."""
    q1, _ = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=dtype))
    q2, _ = torch.linalg.qr(torch.randn(r, r, generator=generator, dtype=dtype))
    s = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), r, dtype=dtype)
    return q1 @ torch.diag(s) @ q2
