"""The per-parameter MLP update fused over a flat bucket of parameters (one device, one dtype).

:class:`~gradmeta.lopt.LearnedOptimizer` concatenates the parameters and gradients of a bucket and
runs :func:`fused_update` once: a few large tensor operations whatever the number of parameter
tensors (segment sums by ``index_add_``, the MLP in row chunks to bound memory). It computes
exactly :meth:`PerParamMLP.flat_update` with the features laid out ``(N, F)`` instead of ``(F, N)``
(equal to 1e-12 in float64, not bitwise: the per-tensor sums are taken in another order), plus
the optimizer's ``lr`` multiplier and decoupled weight decay.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._learned import _SGD_INDEX, DECAYS, TIMESCALES

__all__ = ["fused_update", "CHUNK_ROWS"]

#: Rows (parameter entries) of the MLP evaluated at once: bounds the hidden activations to
#: ``2 · CHUNK_ROWS · hidden`` numbers and keeps them in cache.
CHUNK_ROWS = 1 << 15
_N_MOMENTA = len(DECAYS)


@functools.lru_cache(maxsize=None)
def _constants(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(1 − β)`` as ``(6,)`` and the step-count time scales ``(9,)``."""
    return (1 - torch.tensor(DECAYS, dtype=dtype, device=device),
            torch.tensor(TIMESCALES, dtype=dtype, device=device))


def fused_update(meta: dict[str, Tensor], params: Tensor, grads: Tensor, momenta: Tensor, second: Tensor,
                 t: Tensor, t_enc: Tensor, ids: Tensor, counts: Tensor, *, step_mult: float, max_update: float,
                 lr: float = 1.0, weight_decay: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One learned step of a bucket of ``N`` parameter entries in ``S`` tensors.

    Args:
        meta: :class:`PerParamMLP` meta-parameters in the compute dtype.
        params, grads, second: ``(N,)``; momenta: ``(N, 6)`` (all in the compute dtype).
        t: ``()`` the step number being taken (previous count + 1), for the bias correction.
        t_enc: ``()`` the step number the time encoding sees (``t`` unless rescaled).
        ids: ``(N,)`` int64 index of the tensor of each entry; counts: ``(S, 1)`` entries per tensor.
        step_mult, max_update: the rule's ``λ`` and update bound.
        lr: multiplier on the learned step (0: no movement); weight_decay: decoupled,
            ``θ ← θ·(1 − lr·weight_decay) − lr·clip(Δ)``.

    Returns:
        ``(new_params, new_momenta, new_second, ok)``; ``ok`` is a ``()`` bool, False when
        anything new is not finite (the caller then keeps the old values).
    """
    N = params.shape[0]
    weights, timescales = _constants(params.dtype, params.device)
    m = torch.lerp(momenta, grads.unsqueeze(1), weights)
    v = torch.lerp(second, grads.square(), 0.001)
    rs = torch.rsqrt(v / (1 - 0.999 ** t) + 1e-8)
    F = 2 + 2 * _N_MOMENTA
    x = torch.empty(N, F, dtype=params.dtype, device=params.device)
    x[:, 0], x[:, 1] = params, grads
    x[:, 2:2 + _N_MOMENTA] = m
    torch.mul(m, rs.unsqueeze(1), out=x[:, 2 + _N_MOMENTA:])
    ms = torch.zeros(len(counts), F, dtype=x.dtype, device=x.device).index_add_(0, ids, x.square()) / counts
    x.mul_(torch.rsqrt(ms + 1e-12).index_select(0, ids))
    w0 = meta["w0"]
    bias0 = meta["b0"] + torch.tanh(t_enc / timescales) @ w0[F:]
    out = torch.empty(N, 2, dtype=x.dtype, device=x.device)
    for a in range(0, N, CHUNK_ROWS):
        h = torch.addmm(bias0, x[a:a + CHUNK_ROWS], w0[:F]).relu_()
        h = torch.addmm(meta["b1"], h, meta["w1"]).relu_()
        torch.addmm(meta["b2"], h, meta["w2"], out=out[a:a + CHUNK_ROWS])
    direction, log_scale = out[:, 0].clamp(-10, 10), (0.1 * out[:, 1]).clamp(-3, 3)
    m_sgd = m[:, _SGD_INDEX] / (1 - DECAYS[_SGD_INDEX])
    delta = meta["log_lr"].exp() * (log_scale.exp() * m_sgd + step_mult * direction)
    base = params * (1 - lr * weight_decay) if weight_decay else params
    new = base - lr * delta.clamp(-max_update, max_update) if lr != 1.0 else base - delta.clamp(-max_update, max_update)
    ok = torch.isfinite(new.sum() + m.sum() + v.sum())
    return new, m, v, ok
