"""The per-parameter MLP learned optimizer plus a GradMetaNet branch.

At every inner step the factored gradient set of the batch is collected
(:func:`gradmeta.collect_gradients`, one forward+backward) and a
:class:`gradmeta.nn.GradMetaNet` with a ``"weight"`` readout maps it to ``E`` features per
parameter entry. Those features and their running average (EMA, decay ``avg_decay``, bias
corrected) are concatenated to the per-parameter features of :class:`PerParamMLP`
(``extra_features = 2E``). The update keeps the residual form, so an untrained optimizer is still
SGD with momentum, whatever the GradMetaNet outputs. Meta-parameters are the MLP's (``"mlp.*"``)
and the GradMetaNet's (``"gmn.*"``).

The gradient set is collected with hooks on a real module (a private copy of the task's model, so
the task is never modified), so inner runs are stepped one at a time (its :meth:`map` loops over
particles instead of using ``vmap``) and there is no backpropagation through the unroll: use it
with :class:`PES` or :class:`ES`.

:class:`WeightSpaceLO` is the weight-space (UNF/NFN-style) variant: the branch is an
equivariant network on the parameters and the mean gradient only (no gradient set), so its update
is a pure function that runs under ``vmap`` like :class:`PerParamMLP`.
"""
from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils import _pytree as pytree

from ._learned import LOState, PerParamMLP
from ._rule import LearnedRule

__all__ = ["GradMetaNetLO", "GMNState", "WeightSpaceLO"]

Params = dict[str, Tensor]


class GMNState(NamedTuple):
    """State of :class:`GradMetaNetLO`: the per-parameter optimizer's state and the readout EMA."""

    base: LOState
    avg: Params


class _BranchLO(LearnedRule):
    """Shared by the learned optimizers made of a :class:`PerParamMLP` (``self.base``, meta-parameters
    ``"mlp.*"``) and an equivariant network (``self.net``, meta-parameters ``"<prefix>.*"``)."""

    prefix = "gmn"

    def init_meta(self, seed: int = 0) -> Params:
        """``{"mlp.<name>": ...}`` (last layer zero: untrained = SGDM) and ``{"<prefix>.<name>": ...}``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.net.modules():
                if m is not self.net and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        meta = {f"mlp.{k}": v for k, v in self.base.init_meta(seed).items()}
        meta.update({f"{self.prefix}.{k}": v.detach().clone() for k, v in self.net.named_parameters()})
        return meta

    def _part(self, meta: Params, prefix: str) -> Params:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in meta.items() if k.startswith(prefix + ".")}


class GradMetaNetLO(_BranchLO):
    """Per-parameter MLP learned optimizer with a GradMetaNet branch reading the gradient set.

    Args:
        task: a module-backed task (its ``model`` gives the symmetry spec and runs the hooks).
        gmn_channels: ``E``, GradMetaNet outputs per parameter entry.
        variant: ``"base"`` or ``"plusplus"`` (GradMetaNet++).
        weight_aware: also feed the weights into the GradMetaNet.
        avg_decay: decay of the running average of past readouts.
        channels: GradMetaNet width.
        **kwargs: :class:`PerParamMLP` arguments (``hidden``, ``lr``, ``step_mult``, ``max_update``).
    """

    def __init__(self, task, gmn_channels: int = 4, variant: str = "base", weight_aware: bool = False,
                 avg_decay: float = 0.9, channels: int = 8, **kwargs):
        from gradmeta.nn import GradMetaNet

        if not hasattr(task, "model"):
            raise ValueError(f"GradMetaNetLO needs a module-backed task; {task.name} has no model")
        self.task, self.E, self.avg_decay, self.weight_aware = task, gmn_channels, avg_decay, weight_aware
        self.base = PerParamMLP(extra_features=2 * gmn_channels, **kwargs)
        self.net = GradMetaNet.for_model(task.model, readout="weight", out_dim=gmn_channels, variant=variant,
                                         weight_aware=weight_aware, channels=channels)
        self.lr = self.base.lr
        self._model = copy.deepcopy(task.model)  # runs the hooks; the task's own model is never written
        self._loss_fn, self._split = task.loss_fn, task.split

    def init(self, params: Params) -> GMNState:
        """Fresh state; readout averages start at zero."""
        return GMNState(self.base.init(params), {k: torch.zeros(*v.shape, self.E) for k, v in params.items()})

    def step(self, task, meta: Params, params: Params, state: GMNState, batch: tuple[Tensor, ...]):
        """Collect the gradient set of ``batch`` at ``params`` and apply one update.

        ``task`` must be the task this optimizer was built for (its batches feed the private copy
        of the task's model). Returns ``(new_params, new_state, mean_loss)``.
        """
        import gradmeta as gm

        model = self._model
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
                p.requires_grad_(True)
        try:
            x, y = self._split(batch)
            gs = gm.collect_gradients(model, self._loss_fn, x, y)
        finally:
            for p in model.parameters():
                p.requires_grad_(False)
        new, state = self.update(meta, gs.mean_grad(), state, params, gradient_set=gs)
        return new, state, gs.losses.mean()

    def update(self, meta: Params, grads: Params, state: GMNState, params: Params, *,
               gradient_set=None) -> tuple[Params, GMNState]:
        """One step from the batch's gradient set (``grads`` is its mean gradient).

        Raises:
            ValueError: without ``gradient_set`` (this rule reads more than the mean gradient;
                :meth:`step` collects it).
        """
        if gradient_set is None:
            raise ValueError("GradMetaNetLO.update needs the batch's gradient_set (gradmeta.collect_gradients); "
                             "GradMetaNetLO.step(task, meta, params, state, batch) collects it")
        gmn_meta = self._part(meta, "gmn")
        args = (gradient_set, params) if self.weight_aware else (gradient_set,)
        with torch.no_grad():
            out = functional_call(self.net, gmn_meta, args)
        out = {k: v.reshape(*params[k].shape, self.E) for k, v in out.items()}
        t = state.base.step + 1
        avg = {k: torch.lerp(state.avg[k], out[k], 1 - self.avg_decay) for k in params}
        extra = {k: torch.cat([out[k], avg[k] / (1 - self.avg_decay ** t)], -1) for k in params}
        new, base = self.base.update(self._part(meta, "mlp"), grads, state.base, params, extra)
        ok = base.skipped == state.base.skipped
        avg = {k: torch.where(ok, avg[k], state.avg[k]) for k in params}
        return new, GMNState(base, avg)

    def map(self, fn: Callable, in_dims: tuple) -> Callable:
        """``fn`` run over the stacked inner runs one at a time (hooks are not vmappable), stacked."""
        def looped(*args):
            n = next(pytree.tree_leaves(a)[0].shape[d] for a, d in zip(args, in_dims) if d is not None)
            take = lambda a, d, i: a if d is None else pytree.tree_map(lambda x: x.select(d, i), a)  # noqa: E731
            outs = [fn(*(take(a, d, i) for a, d in zip(args, in_dims))) for i in range(n)]
            return pytree.tree_map(lambda *xs: torch.stack(xs), *outs)
        return looped

    def skipped(self, state: GMNState) -> Tensor:
        return state.base.skipped.sum()

    def check_differentiable(self, who: str) -> None:
        raise ValueError(f"{who}: GradMetaNetLO collects gradient sets with hooks and cannot be differentiated "
                         "through; meta-train it with PES or es_grad / ES")


class WeightSpaceLO(_BranchLO):
    """Per-parameter MLP learned optimizer with a weight-space (UNF/NFN-style) branch.

    An :class:`gradmeta.nn.AveragedGradientNet` with a ``"weight"`` readout (exactly equivariant to
    the inner model's neuron permutations) reads the mean gradient (neuron features: row and column
    means / mean squares) and the parameters (per-entry features), each divided by its RMS per
    tensor, and gives ``E`` features per parameter entry, concatenated to the per-parameter
    features of :class:`PerParamMLP` (``extra_features = E``). Residual form: untrained = SGD with
    momentum. Pure and ``vmap``-able (no gradient set), so outer trainers vectorise its particles.

    Args:
        task: a module-backed task (its ``model`` gives the symmetry spec).
        out_channels: ``E``, branch outputs per parameter entry.
        channels, layers: width and depth of the weight-space net.
        **kwargs: :class:`PerParamMLP` arguments (``hidden``, ``lr``, ``step_mult``, ``max_update``).
    """

    prefix = "ws"

    def __init__(self, task, out_channels: int = 4, channels: int = 8, layers: int = 2, **kwargs):
        from gradmeta.nn import AveragedGradientNet, symmetry_spec

        if not hasattr(task, "model"):
            raise ValueError(f"WeightSpaceLO needs a module-backed task; {task.name} has no model")
        self.E = out_channels
        self.base = PerParamMLP(extra_features=out_channels, **kwargs)
        self.net = AveragedGradientNet(symmetry_spec(task.model), readout="weight", out_dim=out_channels,
                                       weight_aware=True, channels=channels, layers=layers)
        self.lr = self.base.lr

    def init(self, params: Params) -> LOState:
        """The per-parameter optimizer's fresh state."""
        return self.base.init(params)

    def update(self, meta: Params, grads: Params, state: LOState, params: Params) -> tuple[Params, LOState]:
        """One step, as :meth:`PerParamMLP.update`, with the branch's features as ``extra``."""
        rms = lambda t: t * torch.rsqrt(t.square().mean() + 1e-12)  # noqa: E731
        out = functional_call(self.net, self._part(meta, self.prefix),
                              ({k: rms(v) for k, v in grads.items()},), {"params": {k: rms(v) for k, v in params.items()}})
        extra = {k: v.reshape(*params[k].shape, self.E) for k, v in out.items()}
        return self.base.update(self._part(meta, "mlp"), grads, state, params, extra)
