"""Outer trainers: estimate the meta-gradient of a learned optimizer from inner runs.

Every outer trainer is a :class:`GradientEstimator`: it works with any task
(:mod:`gradmeta.lopt._tasks`) and any :class:`~gradmeta.lopt.LearnedRule`, keeps ``particles``
inner runs (stacked along axis 0, advanced together by the rule's ``map``: ``torch.func.vmap``
over functional parameters for pure rules), unrolls them ``truncation`` inner steps per
:meth:`~GradientEstimator.grad` call and resets them after ``horizon`` steps. ``init(meta,
generator)`` gives the particle state, ``grad(meta, state, generator) -> (meta_grad, state, info)``
one estimate, ``to_leaves`` / ``from_leaves`` a checkpointable form of the state. Meta-parameters
named in ``fixed`` are held where they are: never perturbed (PES, ES), their meta-gradient exactly
zero (e.g. a branch meta-trained on top of an already meta-trained rule).

The meta-loss of one truncation is the mean inner *training* loss over its steps (the loss of each
step's batch before that step's update), or with ``objective="valid"`` the mean validation loss after
each step (``task.valid_loss``), or with ``objective="valid_min"`` the *lowest* validation loss
after any of its steps (for :class:`ES`, the best validation loss of the run: what early stopping
would keep); the logarithm of the losses with ``log_loss=True``.

* :class:`PES` -- Persistent Evolution Strategies (Vicol et al. 2021), antithetic: particles come
  in pairs ``θ ± ε`` sharing initialisation and data; each particle accumulates its perturbations
  ``ξ`` since its last reset and the estimate is ``Σ_i ξ_i L_i / (P σ²)`` (computed per pair as
  ``ξ₊ (L₊ − L₋)``), unbiased for the
  gradient of the Gaussian-smoothed loss over the whole horizon.
* :class:`ES` -- full-unroll antithetic ES: PES with ``truncation = horizon`` (every estimate
  unrolls fresh runs over the whole horizon); :func:`es_grad` is one such estimate.
* :class:`TruncatedBackprop` -- the exact gradient of each truncation's loss through its unroll,
  with ``torch.func`` (vectorised over particles) or ``higher`` (one particle at a time).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils import _pytree as pytree

from collections.abc import Iterable

from gradmeta.params import ParamLayout

from ._distributed import Comm, LocalComm
from ._rule import LearnedRule

__all__ = ["unroll", "GradientEstimator", "PES", "ES", "TruncatedBackprop", "es_grad", "meta_loss"]

Params = dict[str, Tensor]


#: Meta-objectives: what the losses of a truncation are and how they are reduced over its steps.
OBJECTIVES: dict[str, str] = {"train": "mean", "valid": "mean", "valid_min": "min"}


def meta_loss(losses: Tensor, log_loss: bool = False, reduce: str = "mean") -> Tensor:
    """Mean (or, ``reduce="min"``, minimum) over the last axis (the steps of a truncation) of
    ``losses`` or ``log(losses)``."""
    x = losses.clamp_min(1e-12).log() if log_loss else losses
    return x.amin(-1) if reduce == "min" else x.mean(-1)


def unroll(task, lo, meta: Params, params: Params, state, batches: tuple[Tensor, ...], objective: str = "train"):
    """Run ``K`` inner steps of the learned rule ``lo``; ``batches`` hold one batch per step (leading axis ``K``).

    Returns:
        ``(params, state, losses)`` with ``losses (K,)`` the mean batch loss before each update
        (``objective="train"``) or the validation loss after it (``"valid"``, ``"valid_min"``:
        ``task.valid_loss``).
    """
    losses = []
    for t in range(batches[0].shape[0]):
        params, state, loss = lo.step(task, meta, params, state, tuple(b[t] for b in batches))
        losses.append(task.valid_loss(params) if objective != "train" else loss)
    return params, state, torch.stack(losses)


class GradientEstimator:
    """Base of the outer trainers: particle bookkeeping (state = plain dict of tensor trees).

    Subclasses implement :meth:`grad`. Arguments as :class:`PES`.
    """

    antithetic = False

    def __init__(self, task, lo, *, particles: int, truncation: int, horizon: int, log_loss: bool = False,
                 comm: Comm | None = None, objective: str = "train", fixed: Iterable[str] = ()):
        if objective not in OBJECTIVES:
            raise ValueError(f"{type(self).__name__}: objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
        self.objective, self._reduce = objective, OBJECTIVES[objective]
        if particles < 1 or truncation < 1 or horizon < truncation:
            raise ValueError(f"{type(self).__name__}: need particles >= 1 and 1 <= truncation <= horizon, got "
                             f"particles={particles}, truncation={truncation}, horizon={horizon}")
        if self.antithetic and particles % 2:
            raise ValueError(f"{type(self).__name__}: antithetic particles come in pairs; particles={particles} is odd")
        self.task, self.lo, self.P, self.K, self.T = task, lo, particles, truncation, horizon
        self.log_loss, self.comm = log_loss, comm or LocalComm()
        self.groups = particles // 2 if self.antithetic else particles  # runs sharing init and data
        self.rep = 2 if self.antithetic else 1
        self.fixed = frozenset(fixed)
        unknown = sorted(self.fixed - set(lo.init_meta(0))) if self.fixed else []
        if unknown:
            raise ValueError(f"{type(self).__name__}: fixed names meta-parameters {type(lo).__name__} does not have: "
                             f"{', '.join(unknown)} (its names: {', '.join(lo.init_meta(0))})")

    def grad(self, meta: Params, state: dict, generator: torch.Generator) -> tuple[Params, dict, dict]:
        """One meta-gradient estimate: ``(meta_grad like meta, new_state, info)``; ``info`` has
        ``"meta_loss"`` (mean over particles) and ``"skipped"`` (skipped inner steps, all particles)."""
        raise NotImplementedError

    def _fresh(self, generator: torch.Generator) -> dict:
        seeds = torch.randint(2**31 - 1, (self.groups,), generator=generator).tolist()
        params = pytree.tree_map(lambda x: x.repeat_interleave(self.rep, 0), self.task.init_stacked(seeds))
        opt_state = vmap(self.lo.init)(params)
        return {"params": params, "opt_state": opt_state, "step": torch.zeros((), dtype=torch.long)}

    def init(self, meta: Params, generator: torch.Generator) -> dict:
        """Fresh particles (initialisations drawn from ``generator``)."""
        state = self._fresh(generator)
        if self.antithetic:
            state["accum"] = {k: torch.zeros(self.P, *v.shape, dtype=v.dtype) for k, v in meta.items()}
        return state

    @staticmethod
    def _ordered(state: dict) -> dict:
        return {k: state[k] for k in ("params", "opt_state", "step", "accum") if k in state}

    def to_leaves(self, state: dict) -> list[Tensor]:
        """The tensors of ``state`` in a fixed order (for ``torch.save`` / ``weights_only`` loads)."""
        return pytree.tree_flatten(self._ordered(state))[0]

    def from_leaves(self, meta: Params, leaves: list[Tensor]) -> dict:
        """Inverse of :meth:`to_leaves`."""
        spec = pytree.tree_flatten(self._ordered(self.init(meta, torch.Generator().manual_seed(0))))[1]
        return pytree.tree_unflatten(list(leaves), spec)

    def _batches(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        """``(K, P, B, ...)`` batches; the runs of one group share them."""
        b = self.task.batches(generator, self.K * self.groups)
        return tuple(x.view(self.K, self.groups, *x.shape[1:]).repeat_interleave(self.rep, 1) for x in b)

    def _advance(self, state: dict, new_local: dict, generator: torch.Generator) -> dict:
        """Gather the ranks' new particle slices; reset every particle at the end of the horizon."""
        gather = self.comm.all_gather_cat if self.comm.world_size > 1 else (lambda x: x)
        new = pytree.tree_map(gather, new_local)
        new["step"] = state["step"] + self.K
        if int(new["step"]) >= self.T:
            fresh = self._fresh(generator)
            new.update(fresh)
            if "accum" in new:
                new["accum"] = pytree.tree_map(torch.zeros_like, new["accum"])
        return new

    def _unroll_local(self, meta_local, state: dict, batches, sl: slice, meta_dim):
        """The rank's particles ``sl`` unrolled over ``batches``: ``(params, opt_state, losses (P_local, K))``."""
        loc = lambda tree: pytree.tree_map(lambda x: x[sl], tree)  # noqa: E731
        fn = lambda m, p, s, b: unroll(self.task, self.lo, m, p, s, b, self.objective)  # noqa: E731
        return self.lo.map(fn, (meta_dim, 0, 0, 1))(meta_local, loc(state["params"]), loc(state["opt_state"]),
                                                    tuple(b[:, sl] for b in batches))

    def _local(self) -> slice:
        g = self.comm.share(self.groups)
        return slice(g.start * self.rep, g.stop * self.rep)


class PES(GradientEstimator):
    """Antithetic Persistent Evolution Strategies over ``particles`` vectorised inner runs.

    Args:
        task: inner task.
        lo: a :class:`~gradmeta.lopt.LearnedRule`.
        particles: number of inner runs (even: ``particles / 2`` antithetic pairs).
        truncation: inner steps per meta-gradient estimate.
        horizon: inner steps after which all runs restart from fresh initialisations.
        sigma: standard deviation of the perturbations of every meta-parameter.
        log_loss: meta-loss on ``log`` of the inner losses.
        comm: splits the pairs over ranks (:mod:`gradmeta.lopt._distributed`); default one process.
        objective: meta-loss on the inner training losses (``"train"``), on the validation loss
            after each step (``"valid"``) or on the lowest of them (``"valid_min"``); the last two
            need a validation split.
        fixed: names of meta-parameters held fixed: not perturbed, meta-gradient zero.
    """

    antithetic = True

    def __init__(self, task, lo, *, particles: int = 8, truncation: int = 50, horizon: int = 2000,
                 sigma: float = 0.01, log_loss: bool = False, comm: Comm | None = None, objective: str = "train",
                 fixed: Iterable[str] = ()):
        super().__init__(task, lo, particles=particles, truncation=truncation, horizon=horizon,
                         log_loss=log_loss, comm=comm, objective=objective, fixed=fixed)
        self.sigma = sigma

    @torch.no_grad()
    def grad(self, meta: Params, state: dict, generator: torch.Generator) -> tuple[Params, dict, dict]:
        """One truncation of every particle.

        Returns:
            ``(meta_grad, new_state, info)``; ``meta_grad`` like ``meta``; ``info`` has the mean
            meta-loss over particles ``"meta_loss"`` (antithetic pairs averaged) and ``"skipped"``,
            the total number of skipped inner steps over particles.
        """
        N, P = self.groups, self.P
        sign = torch.tensor([1.0, -1.0]).repeat(N)
        eps = {k: torch.zeros(P, *v.shape, dtype=v.dtype) if k in self.fixed else
               self.sigma * torch.randn(N, *v.shape, generator=generator, dtype=v.dtype).repeat_interleave(2, 0)
               * sign.view(-1, *[1] * v.dim()) for k, v in meta.items()}
        batches = self._batches(generator)
        sl = self._local()
        theta = {k: meta[k].detach() + eps[k][sl] for k in meta}
        params, opt_state, losses = self._unroll_local(theta, state, batches, sl, 0)
        L = torch.nan_to_num(meta_loss(losses, self.log_loss, self._reduce), nan=1e4, posinf=1e4, neginf=-1e4)  # (P_local,)
        accum = {k: state["accum"][k][sl] + eps[k][sl] for k in meta}
        # Σ_i ξ_i L_i over a pair is ξ₊(L₊ − L₋) (ξ₋ = −ξ₊ exactly); differencing first avoids
        # cancellation. Per-pair terms are gathered and summed in pair order, so the estimate is
        # bitwise the same for any number of ranks (an all-reduce would agree only up to rounding).
        dL = L[0::2] - L[1::2]
        layout = ParamLayout.of(meta)
        contrib = layout.flatten({k: accum[k][0::2] * dL.view(-1, *[1] * meta[k].dim()) for k in meta}, lead=1)
        if self.comm.world_size > 1:
            contrib = self.comm.all_gather_cat(contrib)
        totals = self.comm.all_reduce_sum(torch.stack([L.sum(), self.lo.skipped(opt_state).to(L.dtype)]))
        g = layout.unflatten(contrib.sum(0) / (P * self.sigma ** 2))
        new = self._advance(state, {"params": params, "opt_state": opt_state, "accum": accum}, generator)
        return g, new, {"meta_loss": float(totals[0]) / P, "skipped": int(totals[1])}


class ES(PES):
    """Full-unroll antithetic ES: every :meth:`grad` runs fresh particles over the whole ``horizon``
    and returns ``Σ_pairs ε (L(θ+ε) − L(θ−ε)) / (2 N σ²)`` (:class:`PES` with ``truncation = horizon``).

    Arguments as :class:`PES` without ``truncation``.
    """

    def __init__(self, task, lo, *, particles: int = 8, horizon: int = 50, sigma: float = 0.01,
                 log_loss: bool = False, comm: Comm | None = None, objective: str = "train", fixed: Iterable[str] = ()):
        super().__init__(task, lo, particles=particles, truncation=horizon, horizon=horizon, sigma=sigma,
                         log_loss=log_loss, comm=comm, objective=objective, fixed=fixed)


def es_grad(task, lo, meta: Params, generator: torch.Generator, *, particles: int = 8, horizon: int = 50,
            sigma: float = 0.01, log_loss: bool = False, comm: Comm | None = None,
            objective: str = "train") -> tuple[Params, dict]:
    """One :class:`ES` estimate from fresh inner runs drawn from ``generator``: ``(meta_grad, info)``."""
    es = ES(task, lo, particles=particles, horizon=horizon, sigma=sigma, log_loss=log_loss, comm=comm,
            objective=objective)
    g, _, info = es.grad(meta, es.init(meta, generator), generator)
    return g, info


class TruncatedBackprop(GradientEstimator):
    """Truncated backpropagation through the unroll, averaged over particles.

    Args:
        backend: ``"func"`` (``torch.func.grad`` through the unroll, vmapped over particles) or
            ``"higher"`` (``higher.monkeypatch`` of the task's model and ``autograd.grad`` with
            ``create_graph=True``; module-backed tasks only). Both give the same meta-gradient.
        Other arguments as :class:`PES`.
    """

    def __init__(self, task, lo, *, particles: int = 8, truncation: int = 20, horizon: int = 2000,
                 log_loss: bool = False, backend: str = "func", comm: Comm | None = None, objective: str = "train",
                 fixed: Iterable[str] = ()):
        if backend not in ("func", "higher"):
            raise ValueError(f"TruncatedBackprop: backend must be 'func' or 'higher', got {backend!r}")
        lo.check_differentiable("TruncatedBackprop")
        if backend == "higher" and not hasattr(task, "model"):
            raise ValueError(f"TruncatedBackprop(backend='higher') needs a module-backed task; {task.name} has no model")
        if backend == "higher" and type(lo).step is not LearnedRule.step:
            raise ValueError(f"TruncatedBackprop(backend='higher') differentiates the mean batch gradient only; "
                             f"{type(lo).__name__} reads more of the batch in its own step (e.g. the gradient set): "
                             "use backend='func'")
        super().__init__(task, lo, particles=particles, truncation=truncation, horizon=horizon,
                         log_loss=log_loss, comm=comm, objective=objective, fixed=fixed)
        self.backend = backend

    def _loss_func(self, meta, params, state, batches):
        p, s, losses = unroll(self.task, self.lo, meta, params, state, batches, self.objective)
        return meta_loss(losses, self.log_loss, self._reduce), (p, s)

    def _grad_higher(self, meta, params, state, batches):
        import higher

        task, names = self.task, list(params)
        fmodel = higher.monkeypatch(task.model, copy_initial_weights=True, track_higher_grads=True)
        m = {k: v.detach().requires_grad_() for k, v in meta.items()}
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        losses = []
        with torch.enable_grad():
            for t in range(batches[0].shape[0]):
                x, y = task.split(tuple(b[t] for b in batches))
                loss = task.loss_fn(fmodel(x, params=[p[n] for n in names]), y).mean()
                grads = torch.autograd.grad(loss, [p[n] for n in names], create_graph=True)
                p, state = self.lo.update(m, dict(zip(names, grads)), state, p)
                losses.append(task.valid_loss(p) if self.objective != "train" else loss)
            L = meta_loss(torch.stack(losses), self.log_loss, self._reduce)
            g = dict(zip(m, torch.autograd.grad(L, list(m.values()))))
        detach = lambda tree: pytree.tree_map(lambda x: x.detach(), tree)  # noqa: E731
        return g, L.detach(), detach(p), detach(state)

    def grad(self, meta: Params, state: dict, generator: torch.Generator) -> tuple[Params, dict, dict]:
        """Mean over particles of ``∂(truncation loss)/∂meta``; returns ``(meta_grad, new_state, info)``."""
        batches = self._batches(generator)
        sl = self._local()
        loc = lambda tree: pytree.tree_map(lambda x: x[sl].detach(), tree)  # noqa: E731
        params, opt_state, b = loc(state["params"]), loc(state["opt_state"]), tuple(x[:, sl] for x in batches)
        meta = {k: v.detach() for k, v in meta.items()}
        if self.backend == "func":
            one = grad_and_value(self._loss_func, has_aux=True)
            g, (L, (params, opt_state)) = vmap(one, in_dims=(None, 0, 0, 1))(meta, params, opt_state, b)
        else:
            outs = [self._grad_higher(meta, *(pytree.tree_map(lambda x: x[i], t) for t in (params, opt_state)),
                                      tuple(x[:, i] for x in b)) for i in range(b[0].shape[1])]
            stack = lambda j: pytree.tree_map(lambda *xs: torch.stack(xs), *[o[j] for o in outs])  # noqa: E731
            g, L, params, opt_state = stack(0), stack(1), stack(2), stack(3)
        layout = ParamLayout.of(meta)
        flat = torch.cat([layout.flatten({k: g[k].sum(0) for k in meta}), L.sum().view(1)])
        totals = self.comm.all_reduce_sum(flat.detach())
        out = {k: torch.zeros_like(v) if k in self.fixed else v for k, v in layout.unflatten(totals[:-1] / self.P).items()}
        detach = lambda tree: pytree.tree_map(lambda x: x.detach(), tree)  # noqa: E731
        new = self._advance(state, {"params": detach(params), "opt_state": detach(opt_state)}, generator)
        return out, new, {"meta_loss": float(totals[-1]) / self.P, "skipped": int(self.lo.skipped(opt_state))}
