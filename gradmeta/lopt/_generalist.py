"""A generalist learned optimizer: Adam's direction, modulated by a bounded learned correction,
with a learned step-size schedule over training progress.

State per parameter: the six momenta ``m_k`` of :data:`~gradmeta.lopt.DECAYS` and the second
moment ``v`` (decay 0.999), as :class:`~gradmeta.lopt.LOState`. With the bias-corrected
``m̂_k = m_k / (1 − β_k^t)``, ``v̂ = v / (1 − 0.999^t)`` and ``r = 1 / (√v̂ + 10⁻⁸)`` the rule reads,
per scalar parameter, four *gradient-derived* features (each clamped to ``±10``)

    ``d_fast = m̂_{0.5}·r``, ``d = m̂_{0.9}·r`` (Adam's direction), ``d_slow = m̂_{0.99}·r``, ``g·r``

and the training progress ``p = min(t / total_steps, 1)`` encoded by five radial bases
``φ_i(p) = exp(−((p − c_i) / 0.25)²)``, ``c = 0, ¼, ½, ¾, 1``. A per-parameter MLP
``4 → h → h → 3`` (the progress enters as a bias of its first layer; last layer zero at
initialisation) outputs ``(a, b, c)``, and

    ``u = e^{0.5·tanh a}·d + 0.5·tanh(b)·d_fast + 0.5·tanh(c)·d_slow``
    ``θ ← θ − α(p)·u``,   ``α(p) = exp(log_lr + 2·tanh(w_sched · φ(p)))``.

Properties by construction:

* **untrained = Adam** (β = 0.9, 0.999, ε = 10⁻⁸) at learning rate ``exp(log_lr)`` (unless a
  feature reaches the ±10 clamp);
* **no drift at zero gradient**: every term of ``u`` is a product with a momentum of the
  gradient, so with no gradient ever seen the update is exactly zero, whatever the
  meta-parameters (θ is never an input, and a learned output only ever *scales* a gradient term);
* **bounded**: ``|u| ≤ 1.65·10 + 5 + 5`` and ``α(p) ∈ exp(log_lr ± 2)``, so no learned output can
  blow the step up late in training.

``total_steps`` (the length of the run) sets the progress; ``None`` means an unknown length:
the progress stays ``0`` for the whole run (the rule keeps its start-of-training behaviour and
schedule). During meta-training it is the inner horizon. A step whose new parameters or state
are not finite is skipped (parameters and state kept, ``state.skipped`` counts it). All
operations are pure: the rule runs under ``vmap`` and ``torch.func.grad``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from gradmeta.params import ParamLayout

from ._learned import DECAYS, LOState, uniform_fan_in, zero_moment_state
from ._rule import LearnedRule

__all__ = ["GeneralistRule", "progress_features", "CENTRES"]

Params = dict[str, Tensor]
#: Centres of the radial progress encoding.
CENTRES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
_FAST, _MID, _SLOW = DECAYS.index(0.5), DECAYS.index(0.9), DECAYS.index(0.99)
_CLAMP = 10.0


def progress_features(t: Tensor, total_steps: int | None, dtype: torch.dtype, device) -> Tensor:
    """``φ(p) (5,)`` for step ``t`` (``()`` tensor, 1-based) of a run of ``total_steps`` (``None``: ``p = 0``)."""
    centres = torch.tensor(CENTRES, dtype=dtype, device=device)
    p = (t / total_steps).clamp(max=1.0) if total_steps else torch.zeros((), dtype=dtype, device=device)
    return torch.exp(-((p - centres) / 0.25).square())


class GeneralistRule(LearnedRule):
    """Adam-like generalist learned optimizer (see the module docstring for features and update).

    Args:
        hidden: width of the two hidden layers of the per-parameter MLP.
        lr: initial ``exp(log_lr)`` (the untrained rule is Adam at this learning rate).
        total_steps: length of the run the progress ``p = t / total_steps`` refers to (``None``: ``p = 0``).
    """

    n_features = 4

    def __init__(self, hidden: int = 16, lr: float = 3e-3, total_steps: int | None = None):
        if total_steps is not None and (isinstance(total_steps, bool) or int(total_steps) != total_steps
                                        or total_steps < 1):
            raise ValueError(f"GeneralistRule: total_steps must be a positive integer or None, got {total_steps!r}")
        self.hidden, self.lr = hidden, lr
        self.total_steps = int(total_steps) if total_steps is not None else None

    def config(self) -> dict:
        """Constructor arguments that define the meta-parameters (``total_steps`` is per run, not saved)."""
        return {"hidden": self.hidden, "lr": self.lr}

    def init_meta(self, seed: int = 0) -> Params:
        """MLP ``4 (+5 progress) → h → h → 3`` (last layer zero), ``log_lr``, ``w_sched (5,)`` zero."""
        g = torch.Generator().manual_seed(seed)
        F, P, h = self.n_features, len(CENTRES), self.hidden

        def lin(d_in: int, d_out: int) -> Tensor:
            return uniform_fan_in(d_in, d_out, g)

        return {"w0": lin(F + P, h), "b0": torch.zeros(h), "w1": lin(h, h), "b1": torch.zeros(h),
                "w2": torch.zeros(h, 3), "b2": torch.zeros(3), "log_lr": torch.tensor(math.log(self.lr)),
                "w_sched": torch.zeros(P)}

    def init(self, params: Params) -> LOState:
        """Zero momenta and second moments; ``step = skipped = 0``."""
        return zero_moment_state(params)

    def update(self, meta: Params, grads: Params, state: LOState, params: Params) -> tuple[Params, LOState]:
        """One step: ``(new_params, new_state)``; skipped (inputs returned) if anything is not finite."""
        layout = ParamLayout.of(params)
        new, m, v, ok = self.flat_update(meta, layout.flatten(params), layout.flatten(grads),
                                         layout.flatten(state.momenta, 1), layout.flatten(state.second), state.step)
        keep = lambda a, b: torch.where(ok, a, b)  # noqa: E731
        new, m = keep(new, layout.flatten(params)), keep(m, layout.flatten(state.momenta, 1))
        v, step = keep(v, layout.flatten(state.second)), keep(state.step + 1, state.step)
        return layout.unflatten(new), LOState(step, layout.unflatten(m), layout.unflatten(v),
                                              state.skipped + (~ok).to(state.skipped.dtype))

    def flat_update(self, meta: Params, params: Tensor, grads: Tensor, momenta: Tensor, second: Tensor,
                    step: Tensor, lr: float = 1.0, weight_decay: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The update on flat vectors: params, grads, second ``(N,)``, momenta ``(6, N)``, step ``()`` (before).

        ``lr`` multiplies the step and ``weight_decay`` is decoupled (``θ·(1 − lr·wd) − lr·α·u``),
        as :class:`~gradmeta.lopt.LearnedOptimizer` applies them. Returns ``(new_params,
        new_momenta, new_second, ok)``, ``ok`` a ``()`` bool (False: something is not finite).
        """
        t = step + 1
        decays = torch.tensor(DECAYS, dtype=grads.dtype, device=grads.device).unsqueeze(1)
        m = torch.lerp(momenta, grads.unsqueeze(0), 1 - decays)
        v = torch.lerp(second, grads.square(), 0.001)
        r = 1.0 / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        mhat = m[[_FAST, _MID, _SLOW]] / (1 - decays[[_FAST, _MID, _SLOW]] ** t)
        x = torch.cat([mhat * r, (grads * r).unsqueeze(0)], 0).clamp(-_CLAMP, _CLAMP)  # (4, N)
        phi = progress_features(t, self.total_steps, grads.dtype, grads.device)
        w0 = meta["w0"]
        h = torch.addmm(meta["b0"] + phi @ w0[self.n_features:], x.T, w0[:self.n_features]).relu()
        h = torch.addmm(meta["b1"], h, meta["w1"]).relu()
        out = torch.addmm(meta["b2"], h, meta["w2"]).tanh()  # (N, 3)
        u = (0.5 * out[:, 0]).exp() * x[1] + 0.5 * out[:, 1] * x[0] + 0.5 * out[:, 2] * x[2]
        alpha = (meta["log_lr"] + 2 * torch.tanh(meta["w_sched"] @ phi)).exp()
        base = params * (1 - lr * weight_decay) if weight_decay else params
        new = base - (lr * alpha) * u
        ok = torch.isfinite(new.sum() + m.sum() + v.sum())
        return new, m, v, ok
