"""A generalist learned optimizer: Adam's direction, modulated by a bounded learned correction,
with a learned step-size schedule over training progress.

State per parameter: the six momenta ``m_k`` of :data:`~gradmeta.lopt.DECAYS` (two more rows with
``lr_free``, below) and the second moment ``v`` (decay 0.999), as :class:`~gradmeta.lopt.LOState`. With the bias-corrected
``m̂_k = m_k / (1 − β_k^t)``, ``v̂ = v / (1 − 0.999^t)`` and ``r = 1 / (√v̂ + 10⁻⁸)`` the rule reads,
per scalar parameter, four *gradient-derived* features (each clamped to ``±10``)

    ``d_fast = m̂_{0.5}·r``, ``d = m̂_{0.9}·r`` (Adam's direction), ``d_slow = m̂_{0.99}·r``, ``g·r``

and the training progress ``p = min(t / total_steps, 1)`` encoded by five radial bases
``φ_i(p) = exp(−((p − c_i) / 0.25)²)``, ``c = 0, ¼, ½, ¾, 1``. A per-parameter MLP
``4 → h → h → 3`` (the progress enters as a bias of its first layer; last layer zero at
initialisation) outputs ``(a, b, c)``, and

    ``u = e^{0.5·tanh a}·d + 0.5·tanh(b)·d_fast + 0.5·tanh(c)·d_slow``
    ``θ ← θ − α(p)·u``,   ``α(p) = exp(log_lr + 2·tanh(w_sched · φ(p)))``.

With ``adaptive=True`` the step size also adapts to the task during the run (a learned
hypergradient / Rprop-like rule): a log step size ``s`` per entry, zero at the start, follows

    ``s ← clamp(s + 0.1·tanh(w_adapt · [cos(g, d_prev), clamp(g·r_prev·d_prev, ±1), shrink]), ±3)``,
    ``θ ← θ − α(p)·e^{s}·u``,

where ``d_prev`` is the previous step's Adam direction (from the incoming state; zero before the
first step), ``shrink = clamp(¼·log(|g|² / Σ v̂_prev), ±1)`` (zero at the first step) says how
small this gradient is against the running mean of squared gradients (it falls as the training
loss vanishes, e.g. when a small data set is being memorised), and the cosine and the sums are
over the whole flat vector the rule steps (the model, or one parameter bucket of
:class:`~gradmeta.lopt.LearnedOptimizer`). A gradient that keeps agreeing with the last
direction can grow the step, one that turns against it shrink it; there is no constant term,
so the step size only moves in answer to what the gradients say. ``s`` is kept in
the state slot of the decay-0.1 momentum (which this rule never reads), so the state has the
same shapes as without adaptation. ``w_adapt`` is zero at initialisation (``s`` stays 0).

With ``lr_free=True`` the base step size is not a constant but estimated during the run from
the distance travelled, as in Prodigy (Mishchenko & Defazio, 2023), for the whole flat vector
the rule steps: with ``x₀`` the starting point, ``d`` starting at ``e^{log_d0}`` (a meta-parameter,
``d0 = 10⁻⁴`` at initialisation), ``β = √0.999`` and the step
multiplier ``γ_t = lr·e^{2·tanh(w_sched·φ(p))}·min(1, (1 − p)/0.3)`` (constant, then a linear
decay to zero over the last 30 % of the run),

    ``r ← β·r + (1 − β)·γ_t·d²·⟨g, x₀ − θ⟩``,   ``s ← β·s + (1 − β)·γ_t·d²·g``,
    ``θ ← θ − e^{log_lr}·γ_t·d·u``,   then ``d ← max(d, r / ‖s‖₁)``.

``r / ‖s‖₁`` is, for a convex loss, a lower bound of the ∞-norm distance from ``x₀`` to a
minimiser, so ``d`` grows to the scale of the distance the run has to travel, whatever the
parameterisation or the scale of the loss; the learned ``log_lr`` (zero at initialisation: the
untrained rule is Prodigy's Adam with that schedule) and schedule only multiply it, and the
learned ``log_d0`` sets where it starts (it only grows from there). The state has
``moment_rows = 8`` rows instead of 6: ``d`` and ``r`` (one value per flat vector, stored in the
unread decay-0.999 and 0.9999 rows), ``x₀`` and ``s``.

Properties by construction:

* **untrained = Adam** (β = 0.9, 0.999, ε = 10⁻⁸) at learning rate ``exp(log_lr)`` (unless a
  feature reaches the ±10 clamp);
* **no drift at zero gradient**: every term of ``u`` is a product with a momentum of the
  gradient, so with no gradient ever seen the update is exactly zero, whatever the
  meta-parameters (θ is never an input, and a learned output only ever *scales* a gradient term);
* **bounded**: ``|u| ≤ 1.65·10 + 5 + 5``, ``α(p) ∈ exp(log_lr ± 2)`` and ``e^{s} ∈ e^{±3}``, so no
  learned output can blow the step up late in training.

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

__all__ = ["GeneralistRule", "progress_features", "CENTRES", "ADAPT_FEATURES", "D0"]

Params = dict[str, Tensor]
#: Centres of the radial progress encoding.
CENTRES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
_FAST, _MID, _SLOW = DECAYS.index(0.5), DECAYS.index(0.9), DECAYS.index(0.99)
_CLAMP = 10.0
#: What the adaptive step size reads (``adaptive=True``): the alignment of this gradient with the
#: previous step's Adam direction, over the whole flat vector and per entry.
ADAPT_FEATURES: tuple[str, ...] = ("cos(g, d_prev) over the flat vector", "clamp(g·r_prev·d_prev, ±1) per entry",
                                   "clamp(¼·log(|g|² / Σ v̂_prev), ±1) over the flat vector")
#: Per-step change of the log step size is at most this; the log step size stays within ±_LOG_STEP_MAX.
_ADAPT_RATE, _LOG_STEP_MAX = 0.1, 3.0
#: ``lr_free``: the default starting distance estimate, the decay of ``r`` and ``s``, the decayed fraction of the run.
D0, _BETA_DIST, _DECAY_FRACTION = 1e-4, math.sqrt(0.999), 0.3
#: ``lr_free`` state rows: ``d`` and ``r`` (broadcast over the flat vector), the start ``x₀``, ``s``.
_ROW_D, _ROW_R, _ROW_X0, _ROW_S = 4, 5, 6, 7


def progress_features(t: Tensor, total_steps: int | None, dtype: torch.dtype, device) -> Tensor:
    """``φ(p) (5,)`` for step ``t`` (``()`` tensor, 1-based) of a run of ``total_steps`` (``None``: ``p = 0``)."""
    centres = torch.tensor(CENTRES, dtype=dtype, device=device)
    p = (t / total_steps).clamp(max=1.0) if total_steps else torch.zeros((), dtype=dtype, device=device)
    return torch.exp(-((p - centres) / 0.25).square())


def _decay_tail(t: Tensor, total_steps: int | None) -> Tensor:
    """``min(1, (1 − p) / 0.3)``: 1, then linear to 0 over the last 30 % of the run (1 if ``total_steps`` is None)."""
    if not total_steps:
        return torch.ones((), dtype=t.dtype, device=t.device)
    return ((1 - (t / total_steps).clamp(max=1.0)) / _DECAY_FRACTION).clamp(max=1.0)


def _sqrt(x: Tensor) -> Tensor:
    """``√x`` for ``x ≥ 0``, with derivative 0 instead of ``inf`` at 0 (entries that never had a
    gradient): a meta-gradient through the unroll (truncated backpropagation) stays finite."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1).sqrt(), 0)


def _distance_estimate(params: Tensor, grads: Tensor, momenta: Tensor, step: Tensor, gamma: Tensor, d0: Tensor):
    """Prodigy's step size for one flat vector: ``(d, new rows d, r, x₀, s (4, N))``.

    ``d`` (``()``) is the estimate to step with now (``d0`` at the first step); the rows carry the
    updated ``d ← max(d, r / ‖s‖₁)``, ``r``, ``x₀`` (``params`` at the first step) and ``s``.
    """
    first = step == 0
    x0 = torch.where(first, params, momenta[_ROW_X0])
    d = torch.where(first, d0.to(step.dtype).expand_as(step), momenta[_ROW_D, 0])
    lam = gamma * d * d
    r = _BETA_DIST * momenta[_ROW_R, 0] + (1 - _BETA_DIST) * lam * (grads * (x0 - params)).sum()
    s = _BETA_DIST * momenta[_ROW_S] + (1 - _BETA_DIST) * lam * grads
    d_new = torch.maximum(d, r / s.abs().sum().clamp_min(1e-30))
    return d, torch.stack([d_new.expand_as(s), r.expand_as(s), x0, s])


def _adapted_log_step(w: Tensor, grads: Tensor, momenta: Tensor, second: Tensor, step: Tensor) -> Tensor:
    """New log step size ``(N,)`` from the stored one (``momenta[0]``) and this gradient ``(N,)``.

    ``d_prev = m̂_{0.9}·r`` of the previous step (zero before the first step) from the incoming
    state; ``s ← clamp(s + 0.1·tanh(w · f), ±3)`` with the features ``f`` of :data:`ADAPT_FEATURES`
    (the third, how small this gradient is against the history of squared gradients, is zero at
    the first step). Zero ``w``: ``s`` stays 0.
    """
    prev = step.clamp_min(1)  # before the first step the moments are zero and d_prev = 0
    r_prev = 1.0 / (_sqrt(second / (1 - 0.999 ** prev)) + 1e-8)
    d_prev = (momenta[_MID] / (1 - 0.9 ** prev) * r_prev).clamp(-_CLAMP, _CLAMP)
    cos = (grads * d_prev).sum() / (grads.norm() * d_prev.norm()).clamp_min(1e-30)
    elem = ((grads * r_prev).clamp(-_CLAMP, _CLAMP) * d_prev).clamp(-1.0, 1.0)
    shrink = 0.25 * torch.log(grads.square().sum().clamp_min(1e-30)
                              / (second.sum() / (1 - 0.999 ** prev)).clamp_min(1e-30))
    shrink = torch.where(step > 0, shrink.clamp(-1.0, 1.0), torch.zeros_like(shrink))
    feats = torch.stack([cos.expand_as(elem), elem, shrink.expand_as(elem)])
    delta = _ADAPT_RATE * torch.tanh(w @ feats)
    return (momenta[0] + delta).clamp(-_LOG_STEP_MAX, _LOG_STEP_MAX)


class GeneralistRule(LearnedRule):
    """Adam-like generalist learned optimizer (see the module docstring for features and update).

    Args:
        hidden: width of the two hidden layers of the per-parameter MLP.
        lr: initial ``exp(log_lr)`` (the untrained rule is Adam at this learning rate).
        total_steps: length of the run the progress ``p = t / total_steps`` refers to (``None``: ``p = 0``).
        adaptive: add the learned per-run step-size adaptation (meta-parameter ``w_adapt (3,)``).
        lr_free: estimate the base step size during the run from the distance travelled (Prodigy);
            ``lr`` is then ignored (``exp(log_lr)`` starts at 1, a multiplier of the estimate).
        d0: ``lr_free``: the initial value of the meta-parameter ``exp(log_d0)``, the estimate at
            the first step (it only grows from there).
    """

    n_features = 4

    def __init__(self, hidden: int = 16, lr: float = 3e-3, total_steps: int | None = None, adaptive: bool = False,
                 lr_free: bool = False, d0: float = D0):
        if adaptive and lr_free:
            raise ValueError("GeneralistRule: adaptive=True and lr_free=True are two ways of setting the step size; "
                             "choose one")
        if total_steps is not None and (isinstance(total_steps, bool) or int(total_steps) != total_steps
                                        or total_steps < 1):
            raise ValueError(f"GeneralistRule: total_steps must be a positive integer or None, got {total_steps!r}")
        if not (isinstance(d0, (int, float)) and 0 < d0 < math.inf):
            raise ValueError(f"GeneralistRule: d0 must be a positive finite number, got {d0!r}")
        self.hidden, self.lr, self.adaptive, self.lr_free, self.d0 = hidden, lr, bool(adaptive), bool(lr_free), float(d0)
        self.total_steps = int(total_steps) if total_steps is not None else None

    def config(self) -> dict:
        """Constructor arguments that define the meta-parameters (``total_steps`` is per run, not saved)."""
        return {"hidden": self.hidden, "lr": self.lr, **({"adaptive": True} if self.adaptive else {}),
                **({"lr_free": True, "d0": self.d0} if self.lr_free else {})}

    @property
    def moment_rows(self) -> int:
        """Rows of the per-parameter ``momenta`` state: 6 (one per decay), 8 with ``lr_free``."""
        return len(DECAYS) + 2 if self.lr_free else len(DECAYS)

    def init_meta(self, seed: int = 0) -> Params:
        """MLP ``4 (+5 progress) → h → h → 3`` (last layer zero), ``log_lr``, ``w_sched (5,)`` zero
        (and ``w_adapt (3,)`` zero when adaptive; ``log_d0 = log(d0)`` when lr-free)."""
        g = torch.Generator().manual_seed(seed)
        F, P, h = self.n_features, len(CENTRES), self.hidden

        def lin(d_in: int, d_out: int) -> Tensor:
            return uniform_fan_in(d_in, d_out, g)

        meta = {"w0": lin(F + P, h), "b0": torch.zeros(h), "w1": lin(h, h), "b1": torch.zeros(h),
                "w2": torch.zeros(h, 3), "b2": torch.zeros(3),
                "log_lr": torch.tensor(0.0 if self.lr_free else math.log(self.lr)),
                "w_sched": torch.zeros(P)}
        if self.adaptive:
            meta["w_adapt"] = torch.zeros(len(ADAPT_FEATURES))
        if self.lr_free:
            meta["log_d0"] = torch.tensor(math.log(self.d0))
        return meta

    def init(self, params: Params) -> LOState:
        """Zero momenta (:attr:`moment_rows` rows) and second moments; ``step = skipped = 0``."""
        return zero_moment_state(params, self.moment_rows)

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
        """The update on flat vectors: params, grads, second ``(N,)``, momenta ``(rows, N)``, step ``()`` (before).

        ``lr`` multiplies the step and ``weight_decay`` is decoupled (``θ·(1 − lr·wd) − lr·α·u``),
        as :class:`~gradmeta.lopt.LearnedOptimizer` applies them. Returns ``(new_params,
        new_momenta, new_second, ok)``, ``ok`` a ``()`` bool (False: something is not finite).
        """
        t = step + 1
        decays = torch.tensor(DECAYS, dtype=grads.dtype, device=grads.device).unsqueeze(1)
        if self.adaptive:
            log_step = _adapted_log_step(meta["w_adapt"], grads, momenta, second, step)
        kept = _ROW_D if self.lr_free else len(DECAYS)  # lr-free rows from _ROW_D on hold d, r, x₀, s
        m = torch.lerp(momenta[:kept], grads.unsqueeze(0), 1 - decays[:kept])
        v = torch.lerp(second, grads.square(), 0.001)
        r = 1.0 / (_sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        mhat = m[[_FAST, _MID, _SLOW]] / (1 - decays[[_FAST, _MID, _SLOW]] ** t)
        x = torch.cat([mhat * r, (grads * r).unsqueeze(0)], 0).clamp(-_CLAMP, _CLAMP)  # (4, N)
        phi = progress_features(t, self.total_steps, grads.dtype, grads.device)
        w0 = meta["w0"]
        # entries last, (hidden, N), biases and activations in place: rows of N contiguous entries
        # (the outputs included), no (N, hidden) temporaries copied by an out-of-place activation
        h = (w0[:self.n_features].T @ x).add_((meta["b0"] + phi @ w0[self.n_features:]).unsqueeze(1)).relu_()
        h = (meta["w1"].T @ h).add_(meta["b1"].unsqueeze(1)).relu_()
        out = (meta["w2"].T @ h).add_(meta["b2"].unsqueeze(1)).tanh_()  # (3, N)
        u = (0.5 * out[0]).exp() * x[1] + 0.5 * out[1] * x[0] + 0.5 * out[2] * x[2]
        sched = 2 * torch.tanh(meta["w_sched"] @ phi)
        alpha = (meta["log_lr"] + sched).exp()
        if self.adaptive:
            u = u * log_step.exp()
            m = torch.cat([log_step.unsqueeze(0), m[1:]], 0)
        if self.lr_free:
            tail = _decay_tail(t, self.total_steps)
            d, rows = _distance_estimate(params, grads, momenta, step, lr * sched.exp() * tail, meta["log_d0"].exp())
            alpha = alpha * tail * d
            m = torch.cat([m, rows], 0)
        base = params * (1 - lr * weight_decay) if weight_decay else params
        new = base - (lr * alpha) * u
        ok = torch.isfinite(new.sum() + m.sum() + v.sum())
        return new, m, v, ok
