"""The per-parameter MLP update fused over a flat bucket of parameters (one device, one dtype).

:class:`~gradmeta.lopt.LearnedOptimizer` concatenates the parameters and gradients of a bucket and
runs :func:`fused_update` once: a few large tensor operations whatever the number of parameter
tensors (per-tensor sums as one product with a sparse ``(S, N)`` indicator matrix from
:func:`segment_matrix`, the MLP in row chunks to bound memory). It computes
exactly :meth:`PerParamMLP.flat_update` (equal to 1e-12 in float64, not bitwise: sums and
products are taken in another order), plus
the optimizer's ``lr`` multiplier and decoupled weight decay.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from ._learned import _SGD_INDEX, DECAYS, TIMESCALES

__all__ = ["fused_update", "segment_matrix", "CHUNK_ROWS"]

#: Parameter entries the MLP is evaluated on at once: bounds the hidden activations to
#: ``2 · CHUNK_ROWS · hidden`` numbers and keeps them in cache.
CHUNK_ROWS = 1 << 14
_N_MOMENTA = len(DECAYS)


@functools.lru_cache(maxsize=None)
def _constants(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(1 − β)`` as ``(6,)`` and the step-count time scales ``(9,)``."""
    return (1 - torch.tensor(DECAYS, dtype=dtype, device=device),
            torch.tensor(TIMESCALES, dtype=dtype, device=device))


def segment_matrix(numels: list[int], dtype: torch.dtype, device: torch.device, mean: bool = False) -> Tensor:
    """``(S, N)`` sparse CSR matrix with ``A[s, n] = 1`` (``1 / numel_s`` with ``mean``) when entry
    ``n`` belongs to tensor ``s`` (tensors of ``numels`` entries laid out one after the other):
    ``A @ X`` sums (averages) ``X (N, F)`` per tensor."""
    sizes = torch.tensor(numels, dtype=torch.long, device=device)
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    N = int(offsets[-1])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul with a dense matrix is all we use
        warnings.simplefilter("ignore")
        values = (1 / sizes.to(torch.float64)).repeat_interleave(sizes).to(dtype) if mean else \
            torch.ones(N, dtype=dtype, device=device)
        return torch.sparse_csr_tensor(offsets, torch.arange(N, device=device), values, size=(len(numels), N))


def fused_update(meta: dict[str, Tensor], params: Tensor, grads: Tensor, momenta: Tensor, second: Tensor,
                 t: float, t_enc: float, ids: Tensor, segments: Tensor, *, step_mult: float, max_update: float,
                 lr: float = 1.0, weight_decay: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One learned step of a bucket of ``N`` parameter entries in ``S`` tensors.

    Args:
        meta: :class:`PerParamMLP` meta-parameters in the compute dtype.
        params, grads, second: ``(N,)``; momenta: ``(6, N)`` (all in the compute dtype).
        t: the step number being taken (previous count + 1), for the bias correction.
        t_enc: the step number the time encoding sees (``t`` unless rescaled).
        ids: ``(N,)`` int64 index of the tensor of each entry.
        segments: :func:`segment_matrix` of the tensors, scaled by ``1 / numel`` (per-tensor means).
        step_mult, max_update: the rule's ``λ`` and update bound.
        lr: multiplier on the learned step (0: no movement); weight_decay: decoupled,
            ``θ ← θ·(1 − lr·weight_decay) − lr·clip(Δ)``.

    Returns:
        ``(new_params, new_momenta, new_second, ok)``; ``ok`` is a ``()`` bool, False when
        anything new is not finite (the caller then keeps the old values).
    """
    weights, timescales = _constants(params.dtype, params.device)
    m = torch.lerp(momenta, grads.unsqueeze(0), weights.unsqueeze(1))
    v = torch.lerp(second, grads.square(), 0.001)
    rs = torch.rsqrt(v * (1 / (1 - 0.999 ** t)) + 1e-8)
    N, F = params.shape[0], 2 + 2 * len(DECAYS)
    w0 = meta["w0"]
    time = torch.tanh(torch.full((), t_enc, dtype=params.dtype, device=params.device) / timescales)
    bias0 = torch.addmv(meta["b0"], w0[F:].T, time).unsqueeze(1)
    w0t, w1t, w2t = w0[:F].T, meta["w1"].T, meta["w2"].T
    b1, b2 = meta["b1"].unsqueeze(1), meta["b2"].unsqueeze(1)
    # (h, F) @ (F, n) products, the long axis being the parameter axis: twice as fast on CPU as (n, F) @ (F, h)
    if N <= CHUNK_ROWS:  # one chunk: the features (θ, ∇, m, m·rs) built once, normalised per tensor
        x = torch.cat([params.unsqueeze(0), grads.unsqueeze(0), m, m * rs], 0)  # (F, N)
        x.mul_(torch.rsqrt(segments @ x.square().T + 1e-12).T.index_select(1, ids))
        h = torch.addmm(bias0, w0t, x).relu_()
        out = torch.addmm(b2, w2t, torch.addmm(b1, w1t, h).relu_())  # (2, N)
    else:
        out = _chunked_mlp(params, grads, m, rs, ids, segments, (w0t, bias0, w1t, b1, w2t, b2))
    scale = (0.1 * out[1]).clamp_(-3, 3).exp_()
    delta = torch.addcmul(out[0].clamp(-10, 10).mul_(step_mult), scale, m[_SGD_INDEX],
                          value=1 / (1 - DECAYS[_SGD_INDEX]))
    delta.mul_(meta["log_lr"].exp()).clamp_(-max_update, max_update)
    base = params * (1 - lr * weight_decay) if weight_decay else params
    new = torch.sub(base, delta, alpha=lr) if lr != 1.0 else base - delta
    ok = torch.isfinite(new.sum() + m.sum() + v.sum())
    return new, m, v, ok


def _chunked_mlp(params: Tensor, grads: Tensor, m: Tensor, rs: Tensor, ids: Tensor, segments: Tensor,
                 layers: tuple[Tensor, ...]) -> Tensor:
    """The MLP's ``(2, N)`` outputs, chunk by chunk: the per-tensor mean squares of the features are
    taken without materialising them, and each chunk's features are built in reused buffers (in cache)."""
    w0t, bias0, w1t, b1, w2t, b2 = layers
    m2 = m.square()
    sq = torch.cat([params.square().unsqueeze(0), grads.square().unsqueeze(0), m2, m2 * rs.square()], 0)
    inv_rms = torch.rsqrt(segments @ sq.T + 1e-12).T  # (F, S)
    del sq, m2
    N, outs, D = params.shape[0], [], len(DECAYS)
    x = params.new_empty(inv_rms.shape[0], CHUNK_ROWS)
    h1, h2 = params.new_empty(w0t.shape[0], CHUNK_ROWS), params.new_empty(w1t.shape[0], CHUNK_ROWS)
    for a in range(0, N, CHUNK_ROWS):
        c = slice(a, a + CHUNK_ROWS)
        n = min(CHUNK_ROWS, N - a)
        xc, hc1, hc2 = x[:, :n], h1[:, :n], h2[:, :n]
        xc[0].copy_(params[c])
        xc[1].copy_(grads[c])
        xc[2:2 + D].copy_(m[:, c])
        torch.mul(m[:, c], rs[c], out=xc[2 + D:])
        xc.mul_(inv_rms.index_select(1, ids[c]))
        torch.addmm(bias0, w0t, xc, out=hc1).relu_()
        torch.addmm(b1, w1t, hc1, out=hc2).relu_()
        outs.append(torch.addmm(b2, w2t, hc2))
    return torch.cat(outs, 1)
