"""Hand-designed optimizers as small ``init``/``update`` pairs with named state (optax style).

Every function here is pure (no in-place updates), so an update runs inside ``torch.func.vmap``
(many inner runs at once, or a learning-rate sweep: pass ``lr`` as a batched tensor) and inside
``torch.func.grad``. Parameters, gradients and state fields are ``dict[str, Tensor]`` keyed by
parameter names. ``update(grads, state, params) -> (new_params, new_state)``; gradients are those
of the *mean* loss over the batch.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["Optimizer", "SGDMState", "AdamState", "sgdm", "adam", "ADAM_LRS", "SGDM_LRS"]

#: The Adam learning-rate sweep used to tune Adam in evaluations: {0.0005·j, j = 1..20}.
ADAM_LRS: tuple[float, ...] = tuple(round(0.0005 * j, 6) for j in range(1, 21))
#: A learning-rate sweep for SGD with momentum 0.9 (log grid).
SGDM_LRS: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)

Params = dict[str, Tensor]


class Optimizer(NamedTuple):
    """An ``init(params) -> state`` / ``update(grads, state, params) -> (params, state)`` pair."""

    init: Callable
    update: Callable


class SGDMState(NamedTuple):
    """State of :func:`sgdm`: the momentum buffer ``Σ_k μ^k g_{t-k}`` per parameter."""

    momentum: Params


class AdamState(NamedTuple):
    """State of :func:`adam`: step count ``()`` and first/second moment EMAs per parameter."""

    count: Tensor
    mu: Params
    nu: Params


def sgdm(lr: float | Tensor, momentum: float = 0.9) -> Optimizer:
    """SGD with heavy-ball momentum, as ``torch.optim.SGD(lr, momentum)`` (no dampening, no Nesterov).

    ``buf ← μ·buf + g``, ``θ ← θ − lr·buf`` (``buf`` starts at 0, so the first step is ``lr·g``).
    """
    def init(params: Params) -> SGDMState:
        return SGDMState({k: torch.zeros_like(v) for k, v in params.items()})

    def update(grads: Params, state: SGDMState, params: Params) -> tuple[Params, SGDMState]:
        buf = {k: momentum * state.momentum[k] + grads[k] for k in params}
        return {k: params[k] - lr * buf[k] for k in params}, SGDMState(buf)

    return Optimizer(init, update)


def adam(lr: float | Tensor, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam with bias correction, the same arithmetic as ``torch.optim.Adam`` (single-tensor path).

    ``m ← lerp(m, g, 1−β1)``, ``v ← β2·v + (1−β2)·g²``,
    ``θ ← θ − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε)``.
    """
    def init(params: Params) -> AdamState:
        zeros = lambda: {k: torch.zeros_like(v) for k, v in params.items()}  # noqa: E731
        first = next(iter(params.values()))
        return AdamState(torch.zeros((), dtype=first.dtype, device=first.device), zeros(), zeros())

    def update(grads: Params, state: AdamState, params: Params) -> tuple[Params, AdamState]:
        t = state.count + 1
        mu = {k: torch.lerp(state.mu[k], grads[k], 1 - b1) for k in params}
        nu = {k: b2 * state.nu[k] + (1 - b2) * grads[k] * grads[k] for k in params}
        step_size = lr / (1 - b1 ** t)
        bc2_sqrt = torch.sqrt(1 - b2 ** t)
        new = {k: params[k] - step_size * mu[k] / (nu[k].sqrt() / bc2_sqrt + eps) for k in params}
        return new, AdamState(t, mu, nu)

    return Optimizer(init, update)
