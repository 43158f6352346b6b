"""Learned optimizers: a per-parameter MLP applied to every weight, in residual form.

For every scalar parameter the MLP reads (each feature normalised by its RMS over the tensor,
as in Metz et al. 2022's small per-parameter MLPs):

* ``θ`` and ``∇`` (the gradient of the mean batch loss);
* six momenta ``m_k ← β_k m_k + (1−β_k) ∇`` with ``β = 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999``;
* the same six scaled by ``1/√(v̂+ε)`` (``v`` an EMA of ``∇²``, decay 0.999, bias-corrected);
* a step-count encoding ``tanh(t/τ)`` for ``τ = 1, 3, …, 10⁴`` (shared by all parameters);
* optionally ``extra`` per-parameter features supplied by the caller (e.g. a GradMetaNet readout).

It outputs a direction ``d`` and a log-scale ``s`` per parameter; the update is

    ``θ ← θ − clip(α · (e^{0.1 s} · m_sgd + λ · d), ±max_update)``,  ``α = exp(log_lr)``,

where ``m_sgd = m_{0.9} / 0.1`` is exactly the momentum buffer of SGD with momentum 0.9. The last
layer starts at zero (``d = s = 0``), so an untrained optimizer *is* SGD with momentum at
learning rate ``lr``; ``log_lr`` is a meta-parameter too. A step whose new parameters or state are
not finite is skipped: parameters and state stay as they were and ``state.skipped`` counts it.
All operations are pure and work under ``vmap`` and ``torch.func.grad``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._baselines import Optimizer

__all__ = ["PerParamMLP", "LOState", "DECAYS", "TIMESCALES"]

DECAYS: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
TIMESCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)
_SGD_INDEX = DECAYS.index(0.9)

Params = dict[str, Tensor]


class LOState(NamedTuple):
    """State of a learned optimizer.

    Attributes:
        step: ``()`` number of steps taken (float, skipped steps excluded).
        momenta: per parameter ``(6, *shape)``, the EMAs for :data:`DECAYS`.
        second: per parameter ``(*shape)``, the EMA of ``∇²`` (decay 0.999).
        skipped: ``()`` number of steps skipped because the update was not finite.
    """

    step: Tensor
    momenta: Params
    second: Params
    skipped: Tensor


def _rms_normalise(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / RMS(x)`` over the first axis (the elements of one tensor), per feature column."""
    return x * torch.rsqrt(x.square().mean(0, keepdim=True) + eps)


class PerParamMLP:
    """Per-parameter MLP learned optimizer (see the module docstring for features and update).

    Args:
        hidden: width of the two hidden layers of the MLP.
        lr: initial ``α`` (the untrained optimizer is SGD with momentum 0.9 at this learning rate).
        step_mult: ``λ``, the scale of the learned direction (in units of normalised features).
        max_update: per-element bound on ``|Δθ|`` (update clipping).
        extra_features: number of caller-supplied per-parameter features (0: none).
    """

    n_base_features = 2 + 2 * len(DECAYS) + len(TIMESCALES)

    def __init__(self, hidden: int = 32, lr: float = 0.1, step_mult: float = 0.03, max_update: float = 0.1,
                 extra_features: int = 0):
        self.hidden, self.lr, self.step_mult = hidden, lr, step_mult
        self.max_update, self.extra_features = max_update, extra_features
        self.n_features = self.n_base_features + extra_features

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild this optimizer (``PerParamMLP(**config)``)."""
        return {"hidden": self.hidden, "lr": self.lr, "step_mult": self.step_mult,
                "max_update": self.max_update, "extra_features": self.extra_features}

    def init_meta(self, seed: int = 0) -> Params:
        """Meta-parameters: MLP ``F → h → h → 2`` (last layer zero) and ``log_lr``."""
        g = torch.Generator().manual_seed(seed)
        F, h = self.n_features, self.hidden

        def lin(d_in: int, d_out: int) -> Tensor:
            return (torch.rand(d_in, d_out, generator=g) * 2 - 1) * math.sqrt(6.0 / d_in)

        return {"w0": lin(F, h), "b0": torch.zeros(h), "w1": lin(h, h), "b1": torch.zeros(h),
                "w2": torch.zeros(h, 2), "b2": torch.zeros(2), "log_lr": torch.tensor(math.log(self.lr))}

    def init(self, params: Params) -> LOState:
        """Zero momenta and second moments; ``step = skipped = 0``."""
        first = next(iter(params.values()))
        zero = torch.zeros((), dtype=first.dtype, device=first.device)
        return LOState(zero, {k: torch.zeros(len(DECAYS), *v.shape, dtype=v.dtype, device=v.device)
                              for k, v in params.items()},
                       {k: torch.zeros_like(v) for k, v in params.items()}, zero)

    def _features(self, params: Params, grads: Params, momenta: Params, second: Params, t: Tensor,
                  extra: Params | None) -> Tensor:
        """Per-element features of all parameters, concatenated: ``(total_numel, n_features)``."""
        decays = torch.tensor(TIMESCALES, dtype=t.dtype, device=t.device)
        time = torch.tanh(t / decays)
        bc2 = 1 - 0.999 ** t
        rows = []
        for k in params:
            n = params[k].numel()
            m = momenta[k].reshape(len(DECAYS), n).T
            rs = torch.rsqrt(second[k].reshape(n, 1) / bc2 + 1e-8)
            cols = [params[k].reshape(n, 1), grads[k].reshape(n, 1), m, m * rs]
            if self.extra_features:
                cols.append(extra[k].reshape(n, self.extra_features))
            f = _rms_normalise(torch.cat(cols, 1))
            rows.append(torch.cat([f, time.expand(n, len(TIMESCALES))], 1))
        return torch.cat(rows, 0)

    def update(self, meta: Params, grads: Params, state: LOState, params: Params,
               extra: Params | None = None) -> tuple[Params, LOState]:
        """One step: ``(new_params, new_state)``; skipped (inputs returned) if anything is not finite.

        Args:
            meta: meta-parameters from :meth:`init_meta`.
            grads: gradients of the mean batch loss, like ``params``.
            state: from :meth:`init` or a previous update.
            params: current parameters.
            extra: per-parameter features ``(*shape, extra_features)`` when ``extra_features > 0``.
        """
        if self.extra_features and extra is None:
            raise ValueError(f"PerParamMLP(extra_features={self.extra_features}).update needs extra features")
        t = state.step + 1
        first = next(iter(grads.values()))
        weights = 1 - torch.tensor(DECAYS, dtype=first.dtype, device=first.device)
        momenta = {k: torch.lerp(state.momenta[k], grads[k].unsqueeze(0), weights.view(-1, *[1] * grads[k].dim()))
                   for k in params}
        second = {k: torch.lerp(state.second[k], grads[k].square(), 0.001) for k in params}
        x = self._features(params, grads, momenta, second, t, extra)
        x = torch.relu(x @ meta["w0"] + meta["b0"])
        x = torch.relu(x @ meta["w1"] + meta["b1"])
        out = x @ meta["w2"] + meta["b2"]  # (total, 2)
        # Small output multipliers (as Metz et al.'s λ₁, λ₂) keep early meta-training stable.
        direction, log_scale = out[:, 0].clamp(-10, 10), (0.1 * out[:, 1]).clamp(-3, 3)
        lr = meta["log_lr"].exp()
        new, offset = {}, 0
        for k, p in params.items():
            n = p.numel()
            m_sgd = momenta[k][_SGD_INDEX] / (1 - DECAYS[_SGD_INDEX])
            d = direction[offset:offset + n].view_as(p)
            s = log_scale[offset:offset + n].view_as(p)
            step = lr * (s.exp() * m_sgd + self.step_mult * d)
            new[k] = p - step.clamp(-self.max_update, self.max_update)
            offset += n
        # One reduction: a NaN or ±inf anywhere makes the sum non-finite (finite sums of this size do not overflow).
        ok = torch.isfinite(sum(v.sum() for v in (*new.values(), *momenta.values(), *second.values())))
        keep = lambda a, b: torch.where(ok, a, b)  # noqa: E731
        new = {k: keep(new[k], params[k]) for k in params}
        state = LOState(keep(t, state.step), {k: keep(momenta[k], state.momenta[k]) for k in params},
                        {k: keep(second[k], state.second[k]) for k in params},
                        state.skipped + (~ok).to(state.skipped.dtype))
        return new, state

    def bind(self, meta: Params) -> Optimizer:
        """This optimizer with fixed ``meta`` as an ``init``/``update`` pair like the baselines."""
        return Optimizer(self.init, lambda grads, state, params: self.update(meta, grads, state, params))
