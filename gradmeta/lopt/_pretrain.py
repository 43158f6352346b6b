"""Supervised pretraining of a :class:`GradMetaNetLO`'s branch before meta-training.

PES meta-trains a branch through a noisy zeroth-order estimate, and with gates starting at zero
(``extra_gate``) its GradMetaNet gets no signal until the gates open. :func:`pretrain_branch` first
fits the GradMetaNet's first two output channels, by backpropagation, to two statistics of the same
gradient sets that it reads (:func:`gradmeta.lopt.gradient_set_statistics`: the per-example
gradients' RMS and their agreement), on sets collected along inner training runs of the rule
itself. Meta-training then starts from a branch whose features already carry per-example
information; the other channels, the gates and the MLP are left as they were.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from gradmeta.params import ParamLayout

from ._gmn import GradMetaNetLO, _center, gradient_set_statistics
from ._learned import rms_normalise

__all__ = ["pretrain_branch"]

Params = dict[str, Tensor]
STAT_CHANNELS = 2  # the statistics fitted: RMS and agreement


def _collect(rule: GradMetaNetLO, task, meta: Params, seed: int, steps: int, every: int) -> list[tuple]:
    """``[(params, grads, gradient_set)]`` every ``every`` steps of one inner run of ``rule`` (``meta``)
    from initialisation ``seed``, on the task's training batches."""
    params = task.init(seed)
    state = rule.init(params)
    batches = task.batches(torch.Generator().manual_seed(seed), steps)
    kept = []
    with torch.no_grad():
        for t in range(steps):
            x, y = task.split(tuple(b[t] for b in batches))
            grads, gs, _ = rule.gradients(rule.model, task.loss_fn, params, x, y)
            if t % every == 0:
                kept.append((params, grads, gs))
            params, state = rule.update(meta, grads, state, params, gradient_set=gs)
    return kept


def _targets(rule: GradMetaNetLO, params: Params, gs) -> Tensor:
    """``(2, N)``: the statistics as the MLP would receive them as branch features (centred per tensor
    if the rule centres its branch), each tensor's rows divided by their RMS."""
    layout = ParamLayout.of(params)
    stats = gradient_set_statistics(gs, params)
    rows = torch.cat([stats[k].reshape(-1, STAT_CHANNELS).T for k in params], 1)  # entries in params order
    if rule.center_branch:
        rows = _center(rows, layout.numels)
    return rms_normalise(rows, layout)


def _predict(rule: GradMetaNetLO, meta: Params, params: Params, grads: Params, gs) -> Tensor:
    """``(2, N)``: the branch's first two feature rows, each tensor's rows divided by their RMS."""
    return rms_normalise(rule.branch_features(meta, grads, params, gs)[:STAT_CHANNELS], ParamLayout.of(params))


def _r2(rule: GradMetaNetLO, meta: Params, sets: list[tuple], targets: list[Tensor]) -> list[float]:
    """Per statistic, ``1 − MSE / variance`` of the targets over ``sets``."""
    with torch.no_grad():
        pred = torch.cat([_predict(rule, meta, p, g, gs) for p, g, gs in sets], 1)
        tgt = torch.cat(targets, 1)
        return (1 - (pred - tgt).square().mean(1) / tgt.var(1, unbiased=False).clamp_min(1e-30)).tolist()


def pretrain_branch(rule: GradMetaNetLO, task, meta: Params, *, iterations: int = 1000, lr: float = 1e-2,
                    sets_per_step: int = 8, run_steps: int = 400, every: int = 10, seeds: tuple[int, ...] = (0, 1, 2),
                    seed: int = 0) -> tuple[Params, dict]:
    """Fit the branch's first two channels to the gradient-set statistics; returns ``(meta, info)``.

    Args:
        rule: a :class:`GradMetaNetLO` with ``gmn_channels ≥ 2`` (its branch meta-parameters are
            ``"gmn.*"``).
        task: a module-backed task (``init``, ``batches``, ``split``, ``loss_fn``).
        meta: the rule's meta-parameters; the inner runs that supply the gradient sets use them
            (a fresh rule is SGD with momentum).
        iterations, lr, sets_per_step: Adam steps on the mean squared error, its learning rate,
            and the gradient sets drawn per step.
        run_steps, every: each inner run's length and the spacing of the sets kept from it.
        seeds: initialisation seeds of the inner runs; the last one's sets are held out to measure
            the fit.
        seed: seeds the draws of sets.

    Returns:
        ``meta`` with new ``"gmn.*"`` entries (all others the same tensors), and ``info``:
        ``{"loss_first", "loss_last", "r2_heldout_before", "r2_heldout": [RMS channel, agreement
        channel], "sets": [fit, held out]}`` where the loss is the mean squared error between the
        branch's and the statistics' rows, each tensor's rows divided by their RMS, and the R²s are
        one minus that error over the variance of the targets, on the held-out run's sets, before
        and after the fit.

    Raises:
        ValueError: ``rule`` is not a :class:`GradMetaNetLO`, has fewer than two channels, or
            fewer than two ``seeds`` are given.
    """
    if not isinstance(rule, GradMetaNetLO):
        raise ValueError(f"pretrain_branch fits a GradMetaNetLO's branch, got a {type(rule).__name__}")
    if rule.E < STAT_CHANNELS:
        raise ValueError(f"pretrain_branch fits {STAT_CHANNELS} channels; the rule has gmn_channels={rule.E}")
    if len(seeds) < 2:
        raise ValueError(f"pretrain_branch needs at least two inner-run seeds (the last is held out), got {seeds}")
    fixed = {k: v.detach() for k, v in meta.items()}
    sets = [s for sd in seeds for s in _collect(rule, task, fixed, sd, run_steps, every)]
    n_held = math.ceil(run_steps / every)
    fit, held = sets[:-n_held], sets[-n_held:]
    targets = [_targets(rule, p, gs) for p, _, gs in sets]
    t_fit, t_held = targets[:-n_held], targets[-n_held:]
    r2_before = _r2(rule, fixed, held, t_held)
    branch = {k: v.clone().requires_grad_(True) for k, v in fixed.items() if k.startswith("gmn.")}
    opt = torch.optim.Adam(branch.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(iterations):
        pick = torch.randint(len(fit), (sets_per_step,), generator=gen).tolist()
        m = {**fixed, **branch}
        # one set per term: a set is a set of examples, sets cannot be concatenated into one
        loss = sum((_predict(rule, m, *fit[i]) - t_fit[i]).square().mean() for i in pick) / sets_per_step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    r2 = _r2(rule, {**fixed, **{k: v.detach() for k, v in branch.items()}}, held, t_held)
    info = {"loss_first": losses[0], "loss_last": losses[-1], "r2_heldout_before": r2_before,
            "r2_heldout": r2, "sets": [len(fit), len(held)]}
    return {**meta, **{k: v.detach() for k, v in branch.items()}}, info
