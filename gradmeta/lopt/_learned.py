"""Learned optimizers: a per-parameter MLP applied to every weight, in residual form.

For every scalar parameter the MLP reads (each feature normalised by its RMS over the tensor,
as in Metz et al. 2022's small per-parameter MLPs):

* ``θ`` and ``∇`` (the gradient of the mean batch loss);
* six momenta ``m_k ← β_k m_k + (1−β_k) ∇`` with ``β = 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999``;
* the same six scaled by ``1/√(v̂+ε)`` (``v`` an EMA of ``∇²``, decay 0.999, bias-corrected);
* a step-count encoding ``tanh(t/τ)`` for ``τ = 1, 3, …, 10⁴`` (shared by all parameters);
* optionally ``extra`` per-parameter features supplied by the caller (e.g. a GradMetaNet readout).

With ``extra_gate=True`` the extra features enter through their own first-layer rows ``w0_extra``
times a learned per-feature gate ``extra_gate`` that starts at zero, and the other meta-parameters
are drawn exactly as for the optimizer without extra features: a freshly initialised rule with
extra features then computes exactly the same updates as the plain one of the same seed, and
meta-training can only add the extra features' contribution as far as it helps.

It outputs a direction ``d`` and a log-scale ``s`` per parameter; the update is

    ``θ ← θ − clip(α · (e^{0.1 s} · m_sgd + λ · d), ±max_update)``,  ``α = exp(log_lr)``,

where ``m_sgd = m_{0.9} / 0.1`` is exactly the momentum buffer of SGD with momentum 0.9. The last
layer starts at zero (``d = s = 0``), so an untrained optimizer *is* SGD with momentum at
learning rate ``lr``; ``log_lr`` is a meta-parameter too. A step whose new parameters or state are
not finite is skipped: parameters and state stay as they were and ``state.skipped`` counts it.
All operations are pure and work under ``vmap`` and ``torch.func.grad``.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from gradmeta.params import ParamLayout

from ._rule import LearnedRule

__all__ = ["PerParamMLP", "LOState", "rms_normalise", "DECAYS", "TIMESCALES"]

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


@functools.lru_cache(maxsize=None)
def _constants(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(1 − β)`` as ``(6, 1)`` (the momentum EMA weights) and the step-count time scales ``(9,)``."""
    weights = 1 - torch.tensor(DECAYS, dtype=dtype, device=device).unsqueeze(1)
    return weights, torch.tensor(TIMESCALES, dtype=dtype, device=device)


def uniform_fan_in(d_in: int, d_out: int, generator: torch.Generator) -> Tensor:
    """``(d_in, d_out)`` uniform in ``±√(6 / d_in)`` (He-uniform), drawn from ``generator``."""
    return (torch.rand(d_in, d_out, generator=generator) * 2 - 1) * math.sqrt(6.0 / d_in)


def zero_moment_state(params: Params, rows: int = len(DECAYS)) -> LOState:
    """Zero momenta ``(rows, *shape)`` (default 6, one per decay) and second moments per parameter;
    ``step = skipped = 0``."""
    first = next(iter(params.values()))
    zero = torch.zeros((), dtype=first.dtype, device=first.device)
    return LOState(zero, {k: torch.zeros(rows, *v.shape, dtype=v.dtype, device=v.device)
                          for k, v in params.items()},
                   {k: torch.zeros_like(v) for k, v in params.items()}, zero)


def rms_normalise(x: Tensor, layout: ParamLayout, eps: float = 1e-12) -> Tensor:
    """``x / RMS`` per row of ``x (F, N)`` and per tensor of ``layout`` (its ``N`` flat entries).

    Each tensor's block of columns is scaled by its ``(F, 1)`` factor and the blocks are
    concatenated: under ``vmap`` that is cheaper than gathering a full ``(F, N)`` factor.
    """
    numels = layout.numels
    blocks = x.split(numels, -1)
    counts = torch.tensor(numels, dtype=x.dtype, device=x.device)
    ms = torch.stack([b.square().sum(-1) for b in blocks], -1) / counts
    scale = torch.rsqrt(ms + eps)
    return torch.cat([b * scale[..., k:k + 1] for k, b in enumerate(blocks)], -1)


class PerParamMLP(LearnedRule):
    """Per-parameter MLP learned optimizer (see the module docstring for features and update).

    Args:
        hidden: width of the two hidden layers of the MLP.
        lr: initial ``α`` (the untrained optimizer is SGD with momentum 0.9 at this learning rate).
        step_mult: ``λ``, the scale of the learned direction (in units of normalised features).
        max_update: per-element bound on ``|Δθ|`` (update clipping).
        extra_features: number of caller-supplied per-parameter features (0: none).
        extra_gate: the extra features enter scaled by learned per-feature gates initialised at
            zero (meta-parameters ``w0_extra (extra_features, hidden)`` and ``extra_gate
            (extra_features,)``), and the other meta-parameters are those of
            ``PerParamMLP(extra_features=0)`` of the same seed; ``False``: the extra features are
            more rows of ``w0``, drawn with the others.
    """

    n_base_features = 2 + 2 * len(DECAYS) + len(TIMESCALES)

    def __init__(self, hidden: int = 32, lr: float = 0.1, step_mult: float = 0.03, max_update: float = 0.1,
                 extra_features: int = 0, extra_gate: bool = False):
        if not isinstance(extra_gate, bool):
            raise ValueError(f"PerParamMLP: extra_gate must be True or False, got {extra_gate!r}")
        self.hidden, self.lr, self.step_mult = hidden, lr, step_mult
        self.max_update, self.extra_features, self.extra_gate = max_update, extra_features, extra_gate
        self.n_features = self.n_base_features + extra_features
        self._gated = extra_gate and extra_features > 0

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild this optimizer (``PerParamMLP(**config)``)."""
        config = {"hidden": self.hidden, "lr": self.lr, "step_mult": self.step_mult,
                  "max_update": self.max_update, "extra_features": self.extra_features}
        if self.extra_gate:  # written only when set: configs saved before the option load unchanged
            config["extra_gate"] = True
        return config

    def init_meta(self, seed: int = 0) -> Params:
        """Meta-parameters: MLP ``F → h → h → 2`` (last layer zero) and ``log_lr``; with
        ``extra_gate``, ``w0`` has the base features' rows only (the same draw as without extra
        features) and ``w0_extra``, drawn after all of them, and ``extra_gate = 0`` are added."""
        g = torch.Generator().manual_seed(seed)
        F, h = (self.n_base_features if self._gated else self.n_features), self.hidden

        def lin(d_in: int, d_out: int) -> Tensor:
            return uniform_fan_in(d_in, d_out, g)

        meta = {"w0": lin(F, h), "b0": torch.zeros(h), "w1": lin(h, h), "b1": torch.zeros(h),
                "w2": torch.zeros(h, 2), "b2": torch.zeros(2), "log_lr": torch.tensor(math.log(self.lr))}
        if self._gated:
            # the fan-in of the whole first layer, as the ungated rows have
            bound = math.sqrt(6.0 / self.n_features)
            meta["w0_extra"] = (torch.rand(self.extra_features, h, generator=g) * 2 - 1) * bound
            meta["extra_gate"] = torch.zeros(self.extra_features)
        return meta

    def init(self, params: Params) -> LOState:
        """Zero momenta and second moments; ``step = skipped = 0``."""
        return zero_moment_state(params)

    def update(self, meta: Params, grads: Params, state: LOState, params: Params,
               extra: Params | None = None) -> tuple[Params, LOState]:
        """One step: ``(new_params, new_state)``; skipped (inputs returned) if anything is not finite.

        Args:
            meta: meta-parameters from :meth:`init_meta`.
            grads: gradients of the mean batch loss, like ``params``.
            state: from :meth:`init` or a previous update.
            params: current parameters.
            extra: per-parameter features ``{name: (*shape, extra_features)}`` when ``extra_features > 0``,
                or already flat: ``(extra_features, N)``, the parameters' entries in ``params`` order.
        """
        if self.extra_features and extra is None:
            raise ValueError(f"PerParamMLP(extra_features={self.extra_features}).update needs extra features")
        layout = ParamLayout.of(params)
        flat_extra = None
        if self.extra_features:
            flat_extra = extra if torch.is_tensor(extra) else torch.cat(
                [extra[k].reshape(-1, self.extra_features).T for k in layout.names], 1)
        new, momenta, second, step, skipped = self.flat_update(
            meta, layout, layout.flatten(params), layout.flatten(grads), layout.flatten(state.momenta, 1),
            layout.flatten(state.second), state.step, state.skipped, flat_extra)
        return layout.unflatten(new), LOState(step, layout.unflatten(momenta), layout.unflatten(second), skipped)

    def flat_update(self, meta: Params, layout: ParamLayout, params: Tensor, grads: Tensor, momenta: Tensor,
                    second: Tensor, step: Tensor, skipped: Tensor, extra: Tensor | None = None,
                    keep_if_not_finite: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:meth:`update` on all parameters flattened into one vector (``layout`` says where each lies).

        Args:
            params, grads, second: ``(N,)``; momenta: ``(6, N)``; extra: ``(extra_features, N)``.
            step, skipped: ``()`` counters of the state.
            keep_if_not_finite: select the inputs when the step is not finite (``torch.where``, as
                vmap needs); ``False`` returns the new values and lets the caller branch on
                ``skipped`` (eager callers, where a Python branch is cheaper).

        Returns:
            ``(params, momenta, second, step, skipped)`` after the step (the inputs if it is skipped
            and ``keep_if_not_finite``).
        """
        t = step + 1
        weights, timescales = _constants(grads.dtype, grads.device)
        m = torch.lerp(momenta, grads.unsqueeze(0), weights)
        v = torch.lerp(second, grads.square(), 0.001)
        rs = torch.rsqrt(v / (1 - 0.999 ** t) + 1e-8)
        rows = [params.unsqueeze(0), grads.unsqueeze(0), m, m * rs]
        if extra is not None:
            rows.append(extra)
        x = rms_normalise(torch.cat(rows, 0), layout)  # (F, N)
        # the step-count encoding is the same for every parameter: it enters as a bias
        time = torch.tanh(t / timescales)
        w0 = meta["w0"]
        n_x = x.shape[0] - (self.extra_features if self._gated else 0)  # rows of x read by w0
        w_x = w0[:n_x]
        if self._gated:  # gating the rows scales the features: (g·x)ᵀw = xᵀ(g·w)
            w_x = torch.cat([w_x, meta["extra_gate"].unsqueeze(1) * meta["w0_extra"]], 0)
        # entries last, (h, N): few output rows over a long entry axis, and each bias added in
        # place (an addmm under the particles' vmap is a batched product plus a new broadcast sum)
        h = (w_x.T @ x).add_((meta["b0"] + time @ w0[n_x:]).unsqueeze(1)).relu_()
        h = (meta["w1"].T @ h).add_(meta["b1"].unsqueeze(1)).relu_()
        out = (meta["w2"].T @ h).add_(meta["b2"].unsqueeze(1))  # (2, N)
        # Small output multipliers (as Metz et al.'s λ₁, λ₂) keep early meta-training stable.
        direction, log_scale = out[0].clamp(-10, 10), (0.1 * out[1]).clamp(-3, 3)
        m_sgd = m[_SGD_INDEX] / (1 - DECAYS[_SGD_INDEX])
        delta = meta["log_lr"].exp() * (log_scale.exp() * m_sgd + self.step_mult * direction)
        new = params - delta.clamp(-self.max_update, self.max_update)
        # One reduction: a NaN or ±inf anywhere makes the sum non-finite (finite sums of this size do not overflow).
        ok = torch.isfinite(new.sum() + m.sum() + v.sum())
        if not keep_if_not_finite:
            return new, m, v, t, skipped + (~ok).to(skipped.dtype)
        keep = lambda a, b: torch.where(ok, a, b)  # noqa: E731
        return (keep(new, params), keep(m, momenta), keep(v, second), keep(t, step),
                skipped + (~ok).to(skipped.dtype))
