"""Evaluating optimizers on a task: vectorised training curves, step reduction, step time.

* :func:`train_curves` trains one fresh model per (hyperparameter, seed) pair at once (``vmap``)
  and records the test loss every ``eval_every`` steps;
* :func:`learned_curves` does the same for a learned rule with fixed meta-parameters;
* :func:`step_reduction`: steps tuned Adam needs to reach its best test loss
  ÷ steps the optimizer needs to reach that loss (0 when it never does);
* :func:`step_times` times full training steps (forward, backward, update) of a model with
  :class:`~gradmeta.lopt.LearnedOptimizer` and with ``torch.optim.Adam``, interleaved.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

__all__ = ["train_curves", "learned_curves", "step_reduction", "step_times"]


def train_curves(task, make_opt: Callable, hparams: Tensor, seeds: list[int], steps: int, eval_every: int,
                 data_seed: int = 0) -> dict[str, Tensor]:
    """Train ``len(hparams) × len(seeds)`` inner runs for ``steps`` steps.

    Args:
        task: an inner task.
        make_opt: ``hparam -> Optimizer`` (``init``/``update`` pair); called inside ``vmap``, so
            ``hparam`` is a ``()`` tensor (e.g. a learning rate).
        hparams: ``(H,)`` values, e.g. a learning-rate sweep; ``torch.zeros(1)`` when unused.
        seeds: initialisation seeds; run ``s`` sees the same batches for every hyperparameter.
        steps: inner steps; ``eval_every``: test-loss interval (also at step 0 and at the end).
        data_seed: seeds the batch stream.

    Returns:
        ``{"eval_steps": (E,), "test_loss": (H, S, E), "train_loss": (H, S, steps), "skipped": (H, S)}``.
    """
    H, S = len(hparams), len(seeds)
    init = task.init_stacked(seeds)
    params = {k: v.unsqueeze(0).expand(H, *v.shape).reshape(H * S, *v.shape[1:]).clone() for k, v in init.items()}
    hp = hparams.repeat_interleave(S)
    state = vmap(lambda h, p: make_opt(h).init(p))(hp, params)

    def step(h, p, s, batch):
        grads, loss = grad_and_value(lambda q: task.loss(q, batch).mean())(p)
        p, s = make_opt(h).update(grads, s, p)
        return p, s, loss

    vstep, vtest = vmap(step), vmap(task.test_loss)
    gen = torch.Generator().manual_seed(data_seed)

    def advance():
        nonlocal params, state
        batch = tuple(x.repeat(H, *[1] * (x.dim() - 1)) for x in task.batches(gen, S))
        params, state, loss = vstep(hp, params, state, batch)
        return loss

    eval_steps, tests, trains = _record(steps, eval_every, lambda: vtest(params), advance)
    skipped = getattr(state, "skipped", torch.zeros(H * S))
    return {"eval_steps": eval_steps, "test_loss": tests.view(H, S, -1), "train_loss": trains.view(H, S, -1),
            "skipped": skipped.view(H, S)}


def _record(steps: int, eval_every: int, test: Callable[[], Tensor], advance: Callable[[], Tensor]):
    """Call ``advance()`` (one step, returns the train losses) ``steps`` times and ``test()`` every
    ``eval_every`` steps and at the end: ``(eval_steps (E,), tests (..., E), trains (..., steps))``."""
    eval_steps, tests, trains = [], [], []
    with torch.no_grad():
        for t in range(steps + 1):
            if t % eval_every == 0 or t == steps:
                eval_steps.append(t)
                tests.append(test())
            if t == steps:
                break
            trains.append(advance())
    return torch.tensor(eval_steps), torch.stack(tests, -1), torch.stack(trains, -1)


def learned_curves(task, lo, meta: dict[str, Tensor], seeds: list[int], steps: int, eval_every: int,
                   data_seed: int = 0) -> dict[str, Tensor]:
    """:func:`train_curves` for a :class:`~gradmeta.lopt.LearnedRule` ``lo`` with fixed ``meta``.

    The runs (one per seed) advance together through the rule's ``map`` (``vmap`` for pure rules,
    a loop for rules that collect gradient sets); same batches and output layout as
    :func:`train_curves` with ``H = 1``.
    """
    S = len(seeds)
    params = task.init_stacked(seeds)
    state = lo.map(lo.init, (0,))(params)
    vstep = lo.map(lambda p, s, b: lo.step(task, meta, p, s, b), (0, 0, 0))
    vtest = lo.map(task.test_loss, (0,))
    gen = torch.Generator().manual_seed(data_seed)

    def advance():
        nonlocal params, state
        params, state, loss = vstep(params, state, task.batches(gen, S))
        return loss

    eval_steps, tests, trains = _record(steps, eval_every, lambda: vtest(params), advance)
    skipped = lo.map(lo.skipped, (0,))(state)
    return {"eval_steps": eval_steps, "test_loss": tests.view(1, S, -1), "train_loss": trains.view(1, S, -1),
            "skipped": skipped.view(1, S)}


def step_reduction(reference: Tensor, other: Tensor, eval_steps: Tensor) -> Tensor:
    """Per-seed ``steps_ref(best) / steps_other(reach that loss)``.

    Args:
        reference: ``(S, E)`` test losses of the reference (tuned Adam) at ``eval_steps``.
        other: ``(S, E)`` test losses of the optimizer at the same steps.
        eval_steps: ``(E,)`` step counts.

    Returns:
        ``(S,)``; 0 for a seed where ``other`` never reaches the reference's best loss.
    """
    out = []
    for ref, oth in zip(reference, other):
        ref = torch.nan_to_num(ref, nan=float("inf"))
        i = int(ref.argmin())
        reached = torch.nonzero(torch.nan_to_num(oth, nan=float("inf")) <= ref[i]).flatten()
        s_ref = max(int(eval_steps[i]), 1)
        out.append(s_ref / max(int(eval_steps[reached[0]]), 1) if len(reached) else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def step_times(model: torch.nn.Module, loss_fn: Callable, batch: tuple[Tensor, Tensor], *, checkpoint=None,
               adam_lr: float = 1e-3, repeats: int = 200, warmup: int = 20) -> dict[str, float]:
    """Median wall time (ms) of one full training step with the learned optimizer and with Adam.

    Both optimise copies of ``model`` on the same ``batch``; their steps are interleaved so that
    machine load affects both alike. Returns ``{"lopt_ms", "adam_ms", "ratio"}``.
    """
    from ._optim import LearnedOptimizer

    x, y = batch
    m_lo, m_adam = copy.deepcopy(model), copy.deepcopy(model)
    for m in (m_lo, m_adam):
        for p in m.parameters():
            p.requires_grad_(True)
    lo = LearnedOptimizer(m_lo.parameters(), checkpoint=checkpoint)
    adam = torch.optim.Adam(m_adam.parameters(), lr=adam_lr)

    def lo_step():
        lo.zero_grad(set_to_none=True)
        loss_fn(m_lo(x), y).mean().backward()
        lo.step()

    def adam_step():
        adam.zero_grad(set_to_none=True)
        loss_fn(m_adam(x), y).mean().backward()
        adam.step()

    times = {"lopt": [], "adam": []}
    for i in range(warmup + repeats):
        for name, fn in (("lopt", lo_step), ("adam", adam_step)):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: 1e3 * float(torch.tensor(v).median()) for k, v in times.items()}
    return {"lopt_ms": med["lopt"], "adam_ms": med["adam"], "ratio": med["lopt"] / med["adam"]}
