"""The per-parameter MLP learned optimizer plus an equivariant branch.

:class:`GradMetaNetLO`: at every inner step the factored gradient set of the batch (or of its
first ``examples`` examples) is computed as a pure function of the parameters
(:func:`gradmeta.grads.functional_factors`), and a :class:`gradmeta.nn.GradMetaNet` with a
``"weight"`` readout maps it to ``E`` features per parameter entry. Those features and their
running average over past steps (EMA, decay ``avg_decay``, bias corrected) are concatenated to the
per-parameter features of :class:`PerParamMLP` (``extra_features = 2E``). The update keeps the
residual form, so an untrained optimizer is still SGD with momentum, whatever the GradMetaNet
outputs. With ``extra_gate=True`` those features enter through learned per-feature gates that
start at zero (:class:`PerParamMLP`), so a fresh rule is exactly the per-parameter MLP of the same
seed. With ``center_branch=True`` each tensor's mean is subtracted from the branch's features
(per output channel) before the MLP divides them by their RMS: the MLP then reads how the entries of
a tensor differ (at initialisation GradMetaNet's readouts are more than 99 % a per-tensor constant,
so, divided by their RMS, they are nearly the same number for every entry). Meta-parameters are the
MLP's (``"mlp.*"``) and the GradMetaNet's (``"gmn.*"``). The whole step is pure, so the outer
trainers run its particles under ``torch.func.vmap``.

:class:`WeightSpaceLO` is the weight-space (UNF/NFN-style) variant: the branch is an
equivariant network on the parameters and the mean gradient only (no gradient set).
:class:`GradientStatsLO` is the baseline whose branch is two fixed per-entry statistics of the
gradient set (the per-example gradients' RMS and their agreement), with no network.

Both are built for one architecture (``for_model`` rebuilds one for another) but their
meta-parameters do not depend on the widths of an MLP: hidden neurons are permutable, and the
input / output neurons (whose order matters) are told apart by a size-independent code of their
relative position ``(i + ½)/n`` (:class:`RelativeNeuronIds`), so an optimizer meta-trained on a
64-32-10 MLP runs on a 784-64-64-10 one. Supported inner models: MLPs (``nn.Linear`` and
elementwise activations) and :class:`gradmeta.models.GPT`; anything else (e.g. ``nn.Conv2d``) is
refused with a ``ValueError`` naming the layer.
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from ._learned import LOState, PerParamMLP
from ._rule import LearnedRule

__all__ = ["GradMetaNetLO", "GMNState", "GradientStatsLO", "WeightSpaceLO", "RelativeNeuronIds",
           "gradient_set_statistics"]

Params = dict[str, Tensor]
NEURON_IDS = ("relative", "learned")


class GMNState(NamedTuple):
    """State of :class:`GradMetaNetLO`: the per-parameter optimizer's state and the readout EMA."""

    base: LOState
    avg: Params


class RelativeNeuronIds(nn.Module):
    """Neuron ids of the fixed (input / output) spaces from their relative position, for any size.

    ``ids[name]`` is ``code((i + ½)/n) @ weightᵀ`` for ``i < n`` (``n``, that space's size), with
    ``code(r) = (sin πkr, cos πkr)_{k=1..K}`` and ``weight (c, 2K)``: ``(n, c)``, the same
    meta-parameter for every ``n``. Neuron ``i`` of ``n`` and neuron ``2i`` of ``2n`` get nearly the
    same id (exactly so as ``n`` grows), so a rule trained on 64 inputs reads 784 as a finer grid.
    Replaces the per-neuron table (``nn.ParameterDict`` of ``(n, c)``) of a
    :class:`gradmeta.nn.NeuronEncoder`, which ties a network to one input and output size.
    """

    def __init__(self, sizes: dict[str, int], c: int, frequencies: int = 4):
        super().__init__()
        self.sizes, self.K = dict(sizes), frequencies
        self._codes: dict = {}
        self.weight = nn.Parameter(torch.empty(c, 2 * frequencies))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``N(0, 0.1²)`` entries, the scale of the per-neuron id table it replaces."""
        with torch.no_grad():
            self.weight.normal_(0, 0.1)

    def __getitem__(self, key: str) -> Tensor:
        w = self.weight
        return self.code(self.sizes[key], w.dtype, w.device) @ w.T

    def code(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``(n, 2K)``: ``code((i + ½)/n)`` for ``i < n`` (no meta-parameter: computed once per size)."""
        key = (n, dtype, device)
        if key in self._codes:
            return self._codes[key]
        r = (torch.arange(n, dtype=dtype, device=device) + 0.5) / n
        ang = math.pi * r[:, None] * torch.arange(1, self.K + 1, dtype=dtype, device=device)
        code = torch.cat([ang.sin(), ang.cos()], -1)
        if not torch.is_inference_mode_enabled():  # an inference tensor could not be reused under autograd
            self._codes[key] = code
        return code


def _size_free(net: nn.Module, neuron_ids: str) -> nn.Module:
    """``net`` with its fixed-neuron id table replaced by :class:`RelativeNeuronIds` (``"relative"``)."""
    if neuron_ids not in NEURON_IDS:
        raise ValueError(f"neuron_ids must be one of {NEURON_IDS}, got {neuron_ids!r}")
    enc = net.encoder
    if neuron_ids == "relative" and len(enc.ids):
        c = enc.pos_map.weight.shape[0]
        enc.ids = RelativeNeuronIds({s.name.replace(".", "_"): s.size for s in enc.layout.spec.spaces
                                     if not s.permutable}, c)
    return net


def _model_of(task_or_model, who: str) -> tuple[nn.Module, str]:
    if isinstance(task_or_model, nn.Module):
        return task_or_model, type(task_or_model).__name__
    if not hasattr(task_or_model, "model"):
        raise ValueError(f"{who} needs a module-backed task or an nn.Module; {task_or_model.name} has no model")
    return task_or_model.model, task_or_model.name


def _spec_for(model: nn.Module, who: str, where: str):
    """The model's symmetry spec, or a ``ValueError`` naming the unsupported layer and what is supported."""
    from gradmeta.nn import SymmetrySpecError, symmetry_spec

    try:
        spec = symmetry_spec(model)
        spec.check(model)
    except SymmetrySpecError as e:
        raise ValueError(f"{who}: the inner model of {where} is not supported: {e}. Supported inner models: MLPs "
                         "(nn.Linear layers and elementwise activations, any widths and depth) and "
                         "gradmeta.models.GPT; convolutional layers are not") from None
    return spec


def _center(rows: Tensor, numels: list[int]) -> Tensor:
    """``rows (E, N)`` minus each tensor's mean per row (the tensors' entries lie in consecutive
    blocks of ``numels`` columns)."""
    return torch.cat([b - b.mean(-1, keepdim=True) for b in rows.split(numels, -1)], -1)


def _first_examples(gs, n: int):
    """The ``GradientSet`` of the first ``n`` examples of ``gs`` (its factors sliced along the batch
    axis), or ``None`` when a layer stores something other than per-example tensors."""
    import dataclasses

    from gradmeta.grads import GradientSet

    B, layers = gs.batch_size, {}
    for name in gs:
        f = gs[name]
        inputs = f._inputs
        if not (f.backprops.shape[:1] == (B,) and (inputs is None or (torch.is_tensor(inputs)
                                                                      and inputs.shape[:1] == (B,)))):
            return None
        layers[name] = dataclasses.replace(f, backprops=f.backprops[:n],
                                           _inputs=None if inputs is None else inputs[:n])
    return GradientSet(layers, gs.losses[:n])


class _ParamSlots:
    """``functional_call(module, params, args)`` for a module whose every parameter is given, with
    less bookkeeping: the ``(submodule, attribute)`` slot of each parameter name is found once, and a
    call puts the given tensors in those slots and restores the module's own afterwards (also on an
    error). Any other set of names goes through ``torch.func.functional_call``. The slots are found
    again when a submodule was replaced since (a check of ≈ 30 µs). Per call this saves about 0.3 ms
    for GradMetaNet's ≈ 46 parameters (vmapped over PES particles, on a CPU)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._find_slots()

    def _find_slots(self) -> None:
        m = self.module
        self.tree = tuple(map(id, m.modules()))
        self.slots = [(name, m.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
                      for name, _ in m.named_parameters()]
        self.names = {name for name, _, _ in self.slots}

    def __call__(self, params: Params, args: tuple, kwargs: dict | None = None):
        if tuple(map(id, self.module.modules())) != self.tree:
            self._find_slots()
        if len(params) != len(self.slots) or not self.names.issuperset(params):
            return functional_call(self.module, params, args, kwargs)
        saved = [mod._parameters[attr] for _, mod, attr in self.slots]
        try:
            for name, mod, attr in self.slots:
                mod._parameters[attr] = params[name]
            return self.module(*args, **(kwargs or {}))
        finally:
            for (_, mod, attr), p in zip(self.slots, saved):
                mod._parameters[attr] = p


class _BranchLO(LearnedRule):
    """Shared by the learned optimizers made of a :class:`PerParamMLP` (``self.base``, meta-parameters
    ``"mlp.*"``) and an equivariant network (``self.net``, meta-parameters ``"<prefix>.*"``)."""

    prefix = "gmn"
    kind = ""

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

    def _branch_config(self, center_branch: bool) -> dict:
        """``center_branch`` checked and stored; its config entry (written only when set: configs
        saved before the option load unchanged)."""
        if not isinstance(center_branch, bool):
            raise ValueError(f"{type(self).__name__}: center_branch must be True or False, got {center_branch!r}")
        self.center_branch = center_branch
        return {"center_branch": True} if center_branch else {}

    def _rows(self, per_param: Params, params: Params) -> Tensor:
        """``{name: (*shape, E)}`` (or ``(*shape)`` when ``E = 1``) -> ``(E, N)``, the entries of every
        parameter in ``params`` order."""
        return torch.cat([per_param[k].reshape(*params[k].shape, self.E).movedim(-1, 0).reshape(self.E, -1)
                          .to(params[k].dtype) for k in params], 1)

    def branch_features(self, meta: Params, grads: Params, params: Params, gradient_set=None) -> Tensor:
        """``(E, N)``: the branch's features of every parameter entry (in ``params`` order), as the
        per-parameter MLP receives them before its per-tensor RMS normalisation; each tensor's mean
        removed per channel if ``center_branch``."""
        rows = self._rows(self._branch(self._part(meta, self.prefix), grads, params, gradient_set), params)
        return _center(rows, [params[k].numel() for k in params]) if self.center_branch else rows

    def _branch(self, branch_meta: Params, grads: Params, params: Params, gradient_set) -> Params:
        """``{name: (*shape, E)}`` (or ``(*shape)`` when ``E = 1``): the branch network's readout."""
        raise NotImplementedError

    def _call_net(self, branch_meta: Params, args: tuple, kwargs: dict | None = None):
        """``functional_call(self.net, branch_meta, args, kwargs)`` (:class:`_ParamSlots`)."""
        slots = getattr(self, "_net_slots", None)
        if slots is None or slots.module is not self.net:
            slots = self._net_slots = _ParamSlots(self.net)
        return slots(branch_meta, args, kwargs)

    def _part(self, meta: Params, prefix: str) -> Params:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in meta.items() if k.startswith(prefix + ".")}

    def config(self) -> dict:
        """Constructor arguments but the model: ``type(self)(model, **config)`` rebuilds this optimizer."""
        base = {k: v for k, v in self.base.config().items() if k != "extra_features"}
        return {**self._own_config, **base}

    def for_model(self, model: nn.Module):
        """The same optimizer (same meta-parameter names and shapes for MLPs of any widths) built for ``model``."""
        return type(self)(model, **self.config())

    def gradients(self, model: nn.Module, loss_fn, params: Params, inputs, targets):
        """``(mean_grad, gradient_set or None, mean_loss)`` of ``loss_fn(model(inputs), targets) -> (B,)`` at ``params``."""
        g, loss = grad_and_value(lambda p: loss_fn(functional_call(model, p, (inputs,)), targets).mean())(params)
        return g, None, loss

    def step(self, task, meta: Params, params: Params, state, batch: tuple[Tensor, ...]):
        """One inner step on a batch of a module-backed ``task`` (pure; runs under ``vmap``)."""
        x, y = task.split(batch)
        grads, gs, loss = self.gradients(getattr(self, "model", task.model), task.loss_fn, params, x, y)
        new, state = self.update(meta, grads, state, params, gradient_set=gs)
        return new, state, loss


class _GradientSetBranchLO(_BranchLO):
    """Shared by the rules whose branch reads the batch's gradient set (of its first ``examples``
    examples): the set is collected as a pure function of the parameters, the branch gives ``E``
    features per parameter entry, and they enter :class:`PerParamMLP` with their running average
    (``extra_features = 2E``)."""

    def _setup(self, model, E: int, avg_decay: float, examples, center_branch: bool, mlp_kwargs: dict):
        """Checks and stores what every gradient-set rule has; returns the model's symmetry spec."""
        who = type(self).__name__
        model, where = _model_of(model, who)
        if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
            raise ValueError(f"{who}: examples must be a positive integer or None, got {examples!r}")
        spec = _spec_for(model, who, where)
        self.E, self.avg_decay, self.examples = E, avg_decay, examples
        self._own_config = self._branch_config(center_branch)
        self.base = PerParamMLP(extra_features=2 * E, **mlp_kwargs)
        # functional_factors runs a structure pass on the model's own parameters, which must require
        # grad (a task's skeleton model does not): a private copy, never written
        self.model = copy.deepcopy(model).requires_grad_(True)
        self._structure: dict = {}  # functional_factors' structure_cache for self.model
        self.lr = self.base.lr
        return spec

    def _need_set(self, gradient_set) -> None:
        if gradient_set is None:
            who = type(self).__name__
            raise ValueError(f"{who}.update needs the batch's gradient_set ({who}.gradients or "
                             f"gradmeta.grads.functional_factors); {who}.step(task, meta, params, state, "
                             "batch) computes it")

    def init(self, params: Params) -> GMNState:
        """Fresh state; readout averages start at zero."""
        first = next(iter(params.values()))
        return GMNState(self.base.init(params), {k: torch.zeros(*v.shape, self.E, dtype=first.dtype,
                                                                device=first.device) for k, v in params.items()})

    def gradients(self, model: nn.Module, loss_fn, params: Params, inputs, targets):
        """``(mean_grad, gradient_set, mean_loss)``: the set is of the first ``examples`` examples
        (all when ``examples`` is ``None`` or at least the batch size). Pure in ``params`` and the
        batch (``functional_factors``), so it runs under ``vmap``.

        One factored pass over the whole batch gives the mean gradient and the loss, and its first
        ``examples`` examples are the subsample's set (an example's factors do not depend on the
        others: the model mixes no examples); a set whose stored inputs are not per-example tensors
        (none of the supported layers) is recollected on the subsample instead."""
        from gradmeta.grads import functional_factors

        B = len(targets)
        # the private copy of the inner model never changes: its structure pass runs once per shape
        cache = self._structure if model is self.model else None
        gs = functional_factors(model, loss_fn, params, inputs, targets, structure_cache=cache)
        if self.examples is None or self.examples >= B:
            return gs.mean_grad(), gs, gs.losses.mean()
        sub = _first_examples(gs, self.examples)
        if sub is None:
            sub = functional_factors(model, loss_fn, params, inputs[:self.examples], targets[:self.examples],
                                     structure_cache=cache)
        return gs.mean_grad(), sub, gs.losses.mean()

    def update(self, meta: Params, grads: Params, state: GMNState, params: Params, *,
               gradient_set=None) -> tuple[Params, GMNState]:
        """One step from the batch's gradient set (``grads`` is the whole batch's mean gradient).

        Raises:
            ValueError: without ``gradient_set`` (this rule reads more than the mean gradient;
                :meth:`step` and :meth:`gradients` give it).
        """
        # readouts and their averages as (E, N), the entries of every parameter in order, channels
        # first (the readout's own layout): a few whole-vector operations instead of a few per
        # parameter, and rows of N entries for PerParamMLP's features
        t = state.base.step + 1
        out = self.branch_features(meta, grads, params, gradient_set)
        old_avg = self._rows(state.avg, params)
        avg = torch.lerp(old_avg, out, 1 - self.avg_decay)
        extra = torch.cat([out, avg / (1 - self.avg_decay ** t)], 0)  # (2E, N)
        new, base = self.base.update(self._part(meta, "mlp"), grads, state.base, params, extra)
        avg = torch.where(base.skipped == state.base.skipped, avg, old_avg)
        # each parameter's average as (*shape, E): a view of the (E, N) rows
        avg = {k: a.T.view(*params[k].shape, self.E)
               for k, a in zip(params, avg.split([params[k].numel() for k in params], 1))}
        return new, GMNState(base, avg)

    def skipped(self, state: GMNState) -> Tensor:
        return state.base.skipped.sum()


class GradMetaNetLO(_GradientSetBranchLO):
    """Per-parameter MLP learned optimizer with a GradMetaNet branch reading the gradient set.

    Args:
        model: the inner model (or a module-backed task, whose ``model`` is used): gives the
            symmetry spec; an MLP of any widths or a :class:`gradmeta.models.GPT`.
        gmn_channels: ``E``, GradMetaNet outputs per parameter entry.
        variant: ``"base"`` or ``"plusplus"`` (GradMetaNet++).
        weight_aware: also feed the weights into the GradMetaNet.
        avg_decay: decay of the running average of past readouts.
        channels: GradMetaNet width.
        layers: its set×neuron layers (``"base"``) or attention blocks (``"plusplus"``).
        heads: attention heads of GradMetaNet++ (1: head dimension = ``channels``; on a CPU, 4
            heads of dimension 2 made a PES iteration 1.9× slower).
        neuron_attention: GradMetaNet++'s attention across neurons, ``"softmax"`` or ``"linear"``
            (cost linear in the number of neurons; see :class:`gradmeta.nn.GradMetaNet`).
        examples: feed the GradMetaNet the gradient set of the first ``examples`` examples of each
            batch only (batches drawn at random: a random subsample); the mean gradient is still
            the whole batch's. ``None``: the whole batch.
        neuron_ids: ``"relative"`` (size-independent ids of input / output neurons,
            :class:`RelativeNeuronIds`) or ``"learned"`` (one learned vector per neuron: tied to
            the model's input and output sizes).
        center_branch: subtract each parameter tensor's mean from the GradMetaNet's features, per
            output channel, before the EMA and the MLP (which divides them by their RMS per tensor).
            Equivariance is kept: a tensor's mean is invariant to the permutations of its entries.
        product: GradMetaNet's per-weight readout (:class:`gradmeta.nn.GradMetaNet`): ``"gelu"``
            reads the data-pooled neuron features of the base variant, so it cannot form per-entry
            means over the examples such as the empirical Fisher diagonal ``mean_b δ_b[i]² a_b[j]²``;
            ``"bilinear"`` averages per-datum products ``(U h_b[i]) ⊙ (V h_b[j])`` over the examples
            and can.
        **kwargs: :class:`PerParamMLP` arguments (``hidden``, ``lr``, ``step_mult``, ``max_update``,
            ``extra_gate``: the branch's features enter through learned gates starting at zero, so a
            fresh rule steps exactly as ``PerParamMLP`` of the same seed and meta-training opens the
            branch only as far as it helps).
    """

    kind = "gradmetanet"

    def __init__(self, model, gmn_channels: int = 4, variant: str = "base", weight_aware: bool = False,
                 avg_decay: float = 0.9, channels: int = 8, layers: int = 4, heads: int = 1, examples: int | None = None,
                 neuron_ids: str = "relative", center_branch: bool = False, neuron_attention: str = "softmax",
                 product: str = "gelu", **kwargs):
        from gradmeta.nn import GradMetaNet

        spec = self._setup(model, gmn_channels, avg_decay, examples, center_branch, kwargs)
        self.weight_aware = weight_aware
        self._own_config = {"gmn_channels": gmn_channels, "variant": variant, "weight_aware": weight_aware,
                            "avg_decay": avg_decay, "channels": channels, "layers": layers, "heads": heads,
                            "examples": examples, "neuron_ids": neuron_ids,
                            **({"neuron_attention": neuron_attention} if neuron_attention != "softmax" else {}),
                            **({"product": product} if product != "gelu" else {}),
                            **self._own_config}
        self.net = _size_free(GradMetaNet(spec, readout="weight", out_dim=gmn_channels, variant=variant,
                                          weight_aware=weight_aware, channels=channels, set_layers=layers,
                                          heads=heads, neuron_attention=neuron_attention, product=product),
                              neuron_ids)

    def _branch(self, branch_meta: Params, grads: Params, params: Params, gradient_set) -> Params:
        self._need_set(gradient_set)
        args = (gradient_set, params) if self.weight_aware else (gradient_set,)
        return self._call_net(branch_meta, args)


class GradientStatsLO(_GradientSetBranchLO):
    """Per-parameter MLP learned optimizer whose branch is two fixed statistics of the gradient set.

    A baseline for :class:`GradMetaNetLO`: the same gradient set (of the first ``examples``
    examples), running average, gates and centring, but instead of a network, for every parameter
    entry over the ``n`` examples of the set (per-example gradients ``g_b``):

    * ``r = √((1/n) Σ_b g_b²)``, the RMS of the per-example gradients (the root of the empirical
      Fisher diagonal, :meth:`gradmeta.grads.GradientSet.fisher_diagonal`);
    * ``a = ((1/n) Σ_b g_b) / r`` in ``[−1, 1]``: ±1 when every example pushes the entry the same
      way by the same amount, near 0 when they cancel (0 where ``r = 0``).

    ``E = 2`` features per entry, so ``extra_features = 4`` with their running average. No
    meta-parameters besides the MLP's (``"mlp.*"``). Both statistics are computed entry by entry,
    so the rule is equivariant to every permutation of the inner model's hidden neurons. Tells how
    much a learned optimizer gains from per-example information that a GradMetaNet can represent
    (it can fit the Fisher diagonal) when meta-training does not have to find the features.

    Args:
        model: the inner model (or a module-backed task): an MLP of any widths or a GPT.
        examples, avg_decay, center_branch: as :class:`GradMetaNetLO`.
        **kwargs: :class:`PerParamMLP` arguments (``extra_gate`` as :class:`GradMetaNetLO`).
    """

    prefix = "stats"
    kind = "gradient_stats"

    def __init__(self, model, examples: int | None = None, avg_decay: float = 0.9, center_branch: bool = False,
                 **kwargs):
        self._setup(model, 2, avg_decay, examples, center_branch, kwargs)
        self._own_config = {"examples": examples, "avg_decay": avg_decay, **self._own_config}
        self.net = nn.Module()  # no meta-parameters: init_meta gives the MLP's only

    def _branch(self, branch_meta: Params, grads: Params, params: Params, gradient_set) -> Params:
        self._need_set(gradient_set)
        return gradient_set_statistics(gradient_set, params)


def gradient_set_statistics(gradient_set, params: Params) -> Params:
    """``{name: (*shape, 2)}``: per parameter entry, over the examples of ``gradient_set``, the RMS
    ``r`` of the per-example gradients and their agreement ``mean / r`` in ``[−1, 1]`` (0 where
    ``r = 0``); the features of :class:`GradientStatsLO`. Pure (runs under ``vmap``).

    Raises:
        ValueError: naming the parameters of ``params`` the set has no per-example gradients of.
    """
    fisher, mean = gradient_set.fisher_diagonal(), gradient_set.mean_grad()
    missing = [k for k in params if k not in fisher]
    if missing:
        raise ValueError(f"gradient_set_statistics: the gradient set has no per-example gradients of {missing}")
    out = {}
    for k in params:
        f, m = fisher[k], mean[k]
        # The values are exact at every entry. Their derivatives (backpropagation through an unroll)
        # are exact where r >= floor; the agreement's grows as 1/r and overflows float32 below it,
        # so entries with 0 < r < floor (tiny^(1/4): 1.9e-10 in float32, 1.2e-77 in float64) are
        # held constant there, and entries with r = 0 read 1 in the square root and the divisor.
        floor = torch.finfo(f.dtype).tiny ** 0.25
        live, steep = f > 0, f < floor * floor
        f, m = torch.where(steep, f.detach(), f), torch.where(steep, m.detach(), m)
        r = torch.where(live, torch.where(live, f, 1).sqrt(), 0)
        out[k] = torch.stack([r, torch.where(live, m / torch.where(live, r, 1), 0)], -1)
    return out

class WeightSpaceLO(_BranchLO):
    """Per-parameter MLP learned optimizer with a weight-space (UNF/NFN-style) branch.

    An :class:`gradmeta.nn.AveragedGradientNet` with a ``"weight"`` readout (exactly equivariant to
    the inner model's neuron permutations) reads the mean gradient (neuron features: row and column
    means / mean squares) and the parameters (per-entry features), each divided by its RMS per
    tensor, and gives ``E`` features per parameter entry, concatenated to the per-parameter
    features of :class:`PerParamMLP` (``extra_features = E``). Residual form: untrained = SGD with
    momentum. Pure and ``vmap``-able.

    Args:
        model: the inner model (or a module-backed task): an MLP of any widths or a GPT.
        out_channels: ``E``, branch outputs per parameter entry.
        channels, layers: width and depth of the weight-space net.
        neuron_ids: as :class:`GradMetaNetLO`.
        center_branch: subtract each parameter tensor's mean from the branch's features, per output
            channel, before the MLP (as :class:`GradMetaNetLO`).
        **kwargs: :class:`PerParamMLP` arguments (``hidden``, ``lr``, ``step_mult``, ``max_update``,
            ``extra_gate`` as :class:`GradMetaNetLO`).
    """

    prefix = "ws"
    kind = "weightspace"

    def __init__(self, model, out_channels: int = 4, channels: int = 8, layers: int = 2,
                 neuron_ids: str = "relative", center_branch: bool = False, **kwargs):
        from gradmeta.nn import AveragedGradientNet

        model, where = _model_of(model, "WeightSpaceLO")
        spec = _spec_for(model, "WeightSpaceLO", where)
        self.E = out_channels
        self._own_config = {"out_channels": out_channels, "channels": channels, "layers": layers,
                            "neuron_ids": neuron_ids, **self._branch_config(center_branch)}
        self.base = PerParamMLP(extra_features=out_channels, **kwargs)
        self.net = _size_free(AveragedGradientNet(spec, readout="weight", out_dim=out_channels, weight_aware=True,
                                                  channels=channels, layers=layers), neuron_ids)
        self.lr = self.base.lr

    def init(self, params: Params) -> LOState:
        """The per-parameter optimizer's fresh state."""
        return self.base.init(params)

    def update(self, meta: Params, grads: Params, state: LOState, params: Params, *,
               gradient_set=None) -> tuple[Params, LOState]:
        """One step, as :meth:`PerParamMLP.update`, with the branch's features as ``extra``
        (``gradient_set`` is accepted and unused: this rule reads the mean gradient only)."""
        return self.base.update(self._part(meta, "mlp"), grads, state, params,
                                self.branch_features(meta, grads, params))

    def _branch(self, branch_meta: Params, grads: Params, params: Params, gradient_set) -> Params:
        rms = lambda t: t * torch.rsqrt(t.square().mean() + 1e-12)  # noqa: E731
        return self._call_net(branch_meta, ({k: rms(v) for k, v in grads.items()},),
                              {"params": {k: rms(v) for k, v in params.items()}})
