"""Meta-training and evaluating a learned optimizer from Python.

* :class:`MetaTraining` -- the meta-training state (meta-parameters, the Adam meta-optimiser,
  the random generator, the outer trainer's particles) and one meta-step; ``state_dict`` /
  ``load_state_dict`` make a resumed run continue to bitwise the result of an uninterrupted one;
* :func:`meta_train` -- the loop, with progress, atomic checkpoints in a run folder and resume;
* :func:`evaluate` -- a learned optimizer against lr-tuned Adam on held-out initialisation seeds.

``gradmeta run`` specs (task ``lopt_meta_train``) use the same :class:`MetaTraining`.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .._io import safe_torch_load
from ._baselines import ADAM_LRS, Optimizer, adam
from ._evaluate import learned_curves, step_reduction, train_curves
from ._outer import GradientEstimator
from ._tasks import check_task

__all__ = ["MetaTraining", "meta_train", "evaluate", "CHECKPOINT_NAME"]

#: File name of the meta-training checkpoint inside a run folder.
CHECKPOINT_NAME = "meta_checkpoint.pt"
Params = dict[str, Tensor]


class MetaTraining:
    """Meta-training state and step of ``rule`` with the outer trainer ``outer``.

    Args:
        rule: a :class:`~gradmeta.lopt.LearnedRule`.
        outer: a :class:`~gradmeta.lopt.GradientEstimator` built for ``rule``.
        meta_lr: learning rate of the Adam meta-optimiser.
        grad_clip: the meta-gradient is scaled to at most this norm (a non-finite one to zero).
        seed: seeds the meta-parameters and every random draw of the outer trainer.
        lr_scales: ``{name prefix: factor}``: meta-parameters whose name starts with a prefix are
            stepped at ``meta_lr × factor`` (first matching prefix; e.g. a smaller meta learning
            rate for a branch's ``"gmn."`` meta-parameters); ``None``: one learning rate for all.
        init: starting values for some of the meta-parameters (a subset of ``rule.init_meta``'s names,
            same shapes; e.g. a meta-trained rule's, to meta-train a branch on top of it); the others
            start at ``rule.init_meta(seed)``.

    Meta-parameters the outer trainer holds fixed (its ``fixed`` names) are left out of the
    meta-optimiser: they keep their starting values.
    """

    def __init__(self, rule, outer: GradientEstimator, *, meta_lr: float = 3e-3, grad_clip: float = 1.0,
                 seed: int = 0, lr_scales: dict[str, float] | None = None, init: Params | None = None):
        if not isinstance(outer, GradientEstimator):
            raise TypeError(f"MetaTraining: outer must be a GradientEstimator (PES, ES, TruncatedBackprop), "
                            f"got {type(outer).__name__}")
        if outer.lo is not rule:
            raise ValueError("MetaTraining: the outer trainer was built for another learned optimizer")
        self.rule, self.outer, self.grad_clip = rule, outer, grad_clip
        self.meta = {k: v.requires_grad_() for k, v in rule.init_meta(seed).items()}
        bad = [f"{k} {tuple(v.shape)}" for k, v in (init or {}).items()
               if k not in self.meta or self.meta[k].shape != v.shape]
        if bad:
            raise ValueError(f"MetaTraining: init has meta-parameters that {type(rule).__name__} does not have with that "
                             f"shape: {', '.join(bad)} (its names: "
                             f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in self.meta.items())})")
        with torch.no_grad():
            for k, v in (init or {}).items():
                self.meta[k].copy_(v)
        self.opt = torch.optim.Adam(self._groups(meta_lr, lr_scales or {}), lr=meta_lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.state = None
        self.iteration = 0

    def _groups(self, meta_lr: float, lr_scales: dict[str, float]) -> list[dict]:
        """Adam parameter groups: one per learning rate, in the order of ``self.meta`` (one group, as
        without ``lr_scales``, when every factor is 1)."""
        if not set(self.meta) - self.outer.fixed:
            raise ValueError(f"MetaTraining: the outer trainer holds every meta-parameter of {type(self.rule).__name__} "
                             "fixed; nothing is left to meta-train")
        for prefix, f in lr_scales.items():
            if not (isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 and math.isfinite(f)):
                raise ValueError(f"MetaTraining: lr_scales[{prefix!r}] must be a positive number, got {f!r}")
            if not any(k.startswith(prefix) for k in self.meta):
                raise ValueError(f"MetaTraining: lr_scales prefix {prefix!r} names no meta-parameter of "
                                 f"{type(self.rule).__name__} (names: {', '.join(self.meta)})")
        groups: dict[float, list] = {}
        for k, v in self.meta.items():
            if k in self.outer.fixed:
                continue
            f = next((f for p, f in lr_scales.items() if k.startswith(p)), 1.0)
            groups.setdefault(float(f), []).append(v)
        return [{"params": ps, "lr": meta_lr * f} for f, ps in groups.items()]

    def start(self) -> None:
        """Draw the outer trainer's first particles (after :meth:`load_state_dict` if resuming)."""
        if self.state is None:
            self.state = self.outer.init(self.meta, self.generator)

    def detached(self) -> Params:
        """The current meta-parameters, detached."""
        return {k: v.detach() for k, v in self.meta.items()}

    def step(self) -> dict:
        """One meta-gradient step: ``{"meta_loss", "grad_norm", "skipped"}``."""
        self.start()
        g, self.state, info = self.outer.grad(self.detached(), self.state, self.generator)
        norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
        finite = math.isfinite(norm)
        scale = min(1.0, self.grad_clip / norm) if norm > 0 and finite else 0.0
        for k, v in self.meta.items():  # a non-finite estimate becomes zero (NaN * 0 would stay NaN)
            v.grad = g[k] * scale if finite else torch.zeros_like(v)
        self.opt.step()
        self.iteration += 1
        return {"meta_loss": info["meta_loss"], "grad_norm": norm, "skipped": info["skipped"]}

    def state_dict(self) -> dict:
        """Tensors and plain values only (loadable with ``torch.load(weights_only=True)``)."""
        self.start()
        return {"meta": self.detached(), "opt": self.opt.state_dict(), "generator": self.generator.get_state(),
                "trainer": self.outer.to_leaves(self.state), "iteration": self.iteration}

    def load_state_dict(self, saved: dict) -> None:
        with torch.no_grad():
            for k, v in saved["meta"].items():
                self.meta[k].copy_(v)
        self.opt.load_state_dict(saved["opt"])
        self.generator.set_state(saved["generator"])
        self.state = self.outer.from_leaves(self.meta, saved["trainer"])
        self.iteration = int(saved.get("iteration", 0))


def _outer_for(task, rule, outer) -> GradientEstimator:
    if isinstance(outer, GradientEstimator):
        if outer.task is not task:
            raise ValueError("meta_train: the outer trainer was built for another task")
        return outer
    if callable(outer):  # e.g. functools.partial(PES, particles=8, truncation=20, horizon=200)
        return outer(task, rule)
    raise TypeError(f"meta_train: outer must be a GradientEstimator or a callable (task, rule) -> estimator, "
                    f"got {type(outer).__name__}")


def meta_train(task, rule, outer, *, iterations: int, out: str | os.PathLike | None = None,
               meta_lr: float = 3e-3, grad_clip: float = 1.0, seed: int = 0, checkpoint_every: int = 10,
               progress: bool | Callable[[int, dict], None] = True, init: Params | None = None) -> Params:
    """Meta-train ``rule`` on ``task``; returns the meta-parameters (detached).

    Args:
        task: an inner task (:class:`~gradmeta.lopt.Task`, e.g. a :class:`~gradmeta.lopt.SupervisedTask`).
        rule: the learned optimizer (:class:`~gradmeta.lopt.LearnedRule`) to meta-train.
        outer: a :class:`~gradmeta.lopt.GradientEstimator` for ``task`` and ``rule``, or a callable
            ``(task, rule) -> estimator`` such as ``functools.partial(PES, particles=8, horizon=200)``.
        iterations: total meta-gradient steps.
        out: a run folder: the state is written to ``out/meta_checkpoint.pt`` (atomically) every
            ``checkpoint_every`` iterations and at the end, and a later call with the same ``out``
            resumes from it, to bitwise the result of an uninterrupted run. ``None``: no files.
        meta_lr, grad_clip, seed, init: as :class:`MetaTraining` (a resumed run continues from its
            checkpoint, whatever ``init``).
        progress: ``True`` prints a line to stderr about every 10% of the iterations; a callable
            ``(iteration, info)`` is called after every iteration; ``False`` is silent.
    """
    from gradmeta._io import atomic_write

    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"meta_train: iterations must be a positive integer, got {iterations!r}")
    task = check_task(task, "meta_train")
    mt = MetaTraining(rule, _outer_for(task, rule, outer), meta_lr=meta_lr, grad_clip=grad_clip, seed=seed, init=init)
    path = Path(out) / CHECKPOINT_NAME if out is not None else None
    if path is not None and path.is_file():
        mt.load_state_dict(safe_torch_load(path, "meta-training checkpoint"))
    mt.start()
    t0, every = time.time(), max(1, iterations // 10)
    while mt.iteration < iterations:
        info = mt.step()
        it = mt.iteration
        if callable(progress):
            progress(it, info)
        elif progress and (it % every == 0 or it == iterations):
            print(f"meta_train {it}/{iterations}: meta-loss {info['meta_loss']:.4g}, |g| {info['grad_norm']:.3g}, "
                  f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        if path is not None and (it % checkpoint_every == 0 or it == iterations):
            path.parent.mkdir(parents=True, exist_ok=True)
            sd = mt.state_dict()
            atomic_write(path, lambda f: torch.save(sd, f))
    return mt.detached()


def evaluate(task, rule, meta: Params | None = None, *, seeds: list[int] = (1, 2, 3, 4, 5), steps: int = 300,
             eval_every: int = 10, adam_lrs: list[float] = ADAM_LRS, data_seed: int = 0) -> dict:
    """An optimizer against Adam tuned over ``adam_lrs`` (best mean test loss) on the ``seeds``.

    Args:
        task: an inner task.
        rule: a :class:`~gradmeta.lopt.LearnedRule` (with ``meta``) or a hand-designed
            :class:`~gradmeta.lopt.Optimizer` ``init``/``update`` pair (``meta`` unused).
        seeds, steps, eval_every, data_seed: as :func:`~gradmeta.lopt.train_curves` (every run
            sees the same batches).

    Returns:
        ``{"adam_lr", "eval_steps" (E,), "test_loss" / "adam_test_loss" (S, E), "step_reduction" (S,),
        "best_test_loss" / "final_test_loss" and the same for Adam (S,), "skipped" (S,)}``; step
        reduction = steps tuned Adam needs to reach its best test loss ÷ steps the optimizer needs
        to reach that loss (0 when it never does).
    """
    if not seeds or steps < 1 or eval_every < 1 or not adam_lrs:
        raise ValueError("evaluate: need at least one seed and one Adam learning rate, steps >= 1, eval_every >= 1")
    task, seeds = check_task(task, "evaluate"), list(seeds)
    a = train_curves(task, adam, torch.tensor(list(adam_lrs)), seeds, steps, eval_every, data_seed)
    j = int(torch.nan_to_num(a["test_loss"], nan=float("inf")).min(-1).values.mean(-1).argmin())
    if isinstance(rule, Optimizer):
        c = train_curves(task, lambda _: rule, torch.zeros(1), seeds, steps, eval_every, data_seed)
    else:
        if meta is None:
            raise ValueError("evaluate: a learned rule needs its meta-parameters (meta=...)")
        c = learned_curves(task, rule, meta, seeds, steps, eval_every, data_seed)
    ref, test = a["test_loss"][j], c["test_loss"][0]
    best = lambda t: torch.nan_to_num(t, nan=float("inf")).min(-1).values  # noqa: E731
    return {"adam_lr": float(adam_lrs[j]), "eval_steps": a["eval_steps"], "test_loss": test, "adam_test_loss": ref,
            "step_reduction": step_reduction(ref, test, a["eval_steps"]), "best_test_loss": best(test),
            "final_test_loss": test[:, -1], "adam_best_test_loss": best(ref), "adam_final_test_loss": ref[:, -1],
            "skipped": c["skipped"][0]}
