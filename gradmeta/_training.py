"""One minibatch training loop shared by the experiments and the library's trainable editors.

Private core module: it imports nothing from gradmeta, so any package may use it without
breaking the layering (``grads`` ← ``nn`` ← applications ← experiments).
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["minibatch_train", "SAMPLINGS", "SCHEDULES", "OPTIMIZERS"]

SAMPLINGS = ("permutation", "uniform")
SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "adamw")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"minibatch_train: {name} must be one of {allowed}, got {value!r}")


def _lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """``s -> min(1, (s+1)/warmup) · ½(1 + cos(π s / total))`` (cosine) or without the cosine
    factor (constant); with ``warmup = 0`` the warm-up factor is exactly 1."""
    if schedule == "cosine":
        return lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (
            1 + math.cos(math.pi * min(s, total) / max(total, 1)))
    return lambda s: min(1.0, (s + 1) / max(warmup, 1))


def minibatch_train(params: nn.Module | Iterable[Tensor], batch_loss: Callable[[Tensor], Tensor], n: int, *,
                    steps: int | None = None, epochs: int | None = None, batch_size: int, lr: float,
                    seed: int = 0, sampling: str = "permutation", schedule: str = "constant", warmup: int = 0,
                    clip: float | None = None, optimizer: str = "adam", weight_decay: float = 0.0,
                    log_every: int = 0, average: bool = False, on_log: Callable[[int, float], None] | None = None,
                    progress: bool = False, desc: str | None = None) -> dict[str, list]:
    """Minimise ``batch_loss(indices)`` over minibatches of ``n`` examples with Adam(W).

    Exactly one of ``steps`` and ``epochs`` is given.

    * ``steps``: every step draws ``min(batch_size, n)`` indices with ``torch.Generator`` seeded by
      ``seed``: ``sampling="permutation"`` takes the head of a fresh ``randperm(n)`` (no repeats
      within a batch), ``"uniform"`` draws ``randint(n)`` (with replacement). The learning-rate
      factor at step ``s = 0, 1, ...`` is ``min(1, (s+1)/warmup)`` (1 when ``warmup = 0``) times,
      for ``schedule="cosine"``, ``½(1 + cos(π s / steps))``; the scheduler steps once a step.
    * ``epochs``: every epoch splits a fresh ``randperm(n)`` into consecutive batches of
      ``batch_size`` (the last may be smaller); ``schedule="cosine"`` is torch's
      ``CosineAnnealingLR(T_max=epochs)``, stepped once an epoch (``warmup`` must be 0).

    Each step: ``loss = batch_loss(idx)`` (a ``(G,)`` result is averaged), ``zero_grad``,
    ``backward``, gradient clipping at norm ``clip`` (``None`` / 0: none), optimizer step,
    scheduler step.

    Args:
        params: a module (its ``parameters()``) or an iterable of tensors to train.
        batch_loss: ``(k,) int64 indices -> scalar or (G,) loss`` to minimise.
        n: number of examples the indices range over.
        optimizer: ``"adam"`` or ``"adamw"`` (with ``weight_decay``).
        log_every: with ``steps``, record the loss at every ``log_every``-th step and at the last
            (0: only the last); the recorded value is the loss at that step, or with ``average``
            the mean over the steps since the previous record. With ``epochs`` every epoch is
            recorded with the example-weighted mean loss of its batches.
        on_log: called as ``on_log(step_or_epoch, value)`` at every record.
        progress, desc: a tqdm bar over the steps (or epochs).

    Returns:
        ``{"step": [...], "loss": [...]}`` with ``steps``; ``{"epoch": [0, 1, ...], "loss": [...]}``
        with ``epochs``.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("minibatch_train: give exactly one of steps= and epochs=")
    _check("sampling", sampling, SAMPLINGS)
    _check("schedule", schedule, SCHEDULES)
    _check("optimizer", optimizer, OPTIMIZERS)
    if n < 1 or batch_size < 1:
        raise ValueError(f"minibatch_train: need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    if clip is not None and clip < 0:
        raise ValueError(f"minibatch_train: clip must be >= 0 (0 or None: no clipping), got {clip}")
    if epochs is not None and warmup:
        raise ValueError("minibatch_train: warmup is measured in steps; it cannot be used with epochs=")
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
           else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
    gen = torch.Generator().manual_seed(seed)
    if epochs is not None:
        return _by_epochs(params, opt, batch_loss, n, epochs, batch_size, gen, schedule, clip, on_log, progress, desc)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(schedule, warmup, steps))
             if schedule != "constant" or warmup else None)
    hist: dict[str, list] = {"step": [], "loss": []}
    window: list[float] = []
    for step in _range(1, steps + 1, progress, desc):
        if sampling == "permutation":
            idx = torch.randperm(n, generator=gen)[:min(batch_size, n)]
        else:
            idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        loss = _step(params, opt, batch_loss(idx), clip)
        if sched is not None:
            sched.step()
        value = loss.item()
        window.append(value)
        if (log_every and step % log_every == 0) or step == steps:
            hist["step"].append(step)
            hist["loss"].append(statistics.mean(window) if average else value)
            window = []
            if on_log is not None:
                on_log(step, hist["loss"][-1])
    return hist


def _by_epochs(params, opt, batch_loss, n, epochs, batch_size, gen, schedule, clip, on_log, progress, desc):
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs)) if schedule == "cosine" else None
    hist: dict[str, list] = {"epoch": [], "loss": []}
    for epoch in _range(0, epochs, progress, desc):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            total += _step(params, opt, batch_loss(idx), clip).item() * len(idx)
        if sched is not None:
            sched.step()
        hist["epoch"].append(epoch)
        hist["loss"].append(total / n)
        if on_log is not None:
            on_log(epoch, hist["loss"][-1])
    return hist


def _step(params: list[Tensor], opt: torch.optim.Optimizer, loss: Tensor, clip: float | None) -> Tensor:
    loss = loss.mean() if loss.dim() else loss
    opt.zero_grad()
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return loss


def _range(start: int, stop: int, progress: bool, desc: str | None):
    if not progress:
        return range(start, stop)
    from tqdm.auto import tqdm
    return tqdm(range(start, stop), desc=desc, leave=False)
