"""``LearnedOptimizer``: a trained learned optimizer as a drop-in ``torch.optim.Optimizer``.

Use it where ``torch.optim.Adam`` would go::

    opt = LearnedOptimizer(model.parameters(), total_steps=len(batches))   # the shipped generalist
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


Checkpoint files (written by :func:`save_checkpoint`, read with ``torch.load(weights_only=True)``)
hold ``{"format", "kind", "config", "meta"}``: the optimizer class's constructor arguments and its
meta-parameters. The package ships two, by name in :data:`NAMED_CHECKPOINTS`:

* ``"generalist"`` (the default), ``checkpoints/lopt_generalist.pt``, a :class:`GeneralistRule`
  meta-trained on a distribution of tasks by ``benchmarks/lopt_generalist.py`` (settings in
  ``checkpoints/lopt_generalist.toml``): Adam's direction with a learned, bounded correction, a
  base step size estimated during the run from the distance travelled (no learning rate to tune)
  and a learned schedule over the progress ``t / total_steps``; it never moves a parameter whose
  gradient has always been zero;
* ``"digits"``, ``checkpoints/lopt_digits.pt``, a :class:`PerParamMLP` meta-trained on the digits
  MLP only by ``gradmeta run tasks/lopt_digits.toml`` (the spec lies next to it): faster than tuned
  Adam on that task and MLPs like it, worse elsewhere, and it drifts at zero gradient.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .._io import safe_torch_load
from ._fused import fused_update, segment_matrix
from ._generalist import GeneralistRule
from ._gmn import GradientStatsLO, GradMetaNetLO, WeightSpaceLO
from ._learned import DECAYS, PerParamMLP

__all__ = ["LearnedOptimizer", "save_checkpoint", "load_checkpoint", "checkpoint_horizon", "DEFAULT_CHECKPOINT",
           "CHECKPOINT_FORMAT", "NAMED_CHECKPOINTS"]

CHECKPOINT_FORMAT = "gradmeta.lopt/1"
#: The checkpoint loaded by ``LearnedOptimizer(params)``: the generalist, meta-trained on a distribution of tasks.
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "lopt_generalist.pt"
#: Shipped checkpoints by name (``LearnedOptimizer(params, checkpoint="digits")``).
NAMED_CHECKPOINTS = {"generalist": DEFAULT_CHECKPOINT,
                     "digits": Path(__file__).parent / "checkpoints" / "lopt_digits.pt"}
_KINDS = {"per_param_mlp": PerParamMLP, "gradmetanet": GradMetaNetLO, "weightspace": WeightSpaceLO,
          "gradient_stats": GradientStatsLO,
          "generalist": GeneralistRule}
_FLAT_KINDS = (PerParamMLP, GeneralistRule)  # rules that read only p.grad (usable by LearnedOptimizer)


def _resolve(path) -> Path:
    """A checkpoint path, or the file of a shipped checkpoint named in :data:`NAMED_CHECKPOINTS`."""
    if path is None:
        return DEFAULT_CHECKPOINT
    if isinstance(path, str) and path in NAMED_CHECKPOINTS and not Path(path).is_file():
        return NAMED_CHECKPOINTS[path]
    return Path(path)


def save_checkpoint(path: str | os.PathLike, lo, meta: dict[str, Tensor], **info) -> Path:
    """Write ``lo``'s kind, config and ``meta`` (plus scalar/string ``info``) to ``path`` atomically.

    ``lo``: a :class:`PerParamMLP` (used by :class:`LearnedOptimizer`), a :class:`GradMetaNetLO`
    or a :class:`WeightSpaceLO` (used by :class:`~gradmeta.lopt.GradientSetOptimizer`).
    """
    from gradmeta._io import atomic_write

    kinds = {v: k for k, v in _KINDS.items()}
    if type(lo) not in kinds:
        raise TypeError(f"save_checkpoint: cannot save a {type(lo).__name__}; kinds: "
                        + ", ".join(f"{k} ({v.__name__})" for k, v in _KINDS.items()))
    blob = {"format": CHECKPOINT_FORMAT, "kind": kinds[type(lo)], "config": lo.config(),
            "meta": {k: v.detach().clone().cpu() for k, v in meta.items()}, "info": dict(info)}
    return atomic_write(path, lambda f: torch.save(blob, f))


def checkpoint_horizon(path: str | os.PathLike | None = None) -> int | None:
    """The inner horizon a checkpoint was meta-trained on: its ``info["horizon"]``, else
    ``outer.horizon`` of the spec lying next to it (``<name>.toml``), else ``None``."""
    path = _resolve(path)
    blob = safe_torch_load(path, "learned-optimizer checkpoint")
    info = blob.get("info", {}) if isinstance(blob, dict) else {}
    if "horizon" in info:
        return int(info["horizon"])
    spec = path.with_suffix(".toml")
    if spec.is_file():
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        horizon = tomllib.loads(spec.read_text()).get("outer", {}).get("horizon")
        return int(horizon) if horizon is not None else None
    return None


def load_checkpoint(path: str | os.PathLike | None = None, model: nn.Module | None = None):
    """``(optimizer, meta)`` from a checkpoint file (default :data:`DEFAULT_CHECKPOINT`), ``weights_only``.

    Args:
        path: a file from :func:`save_checkpoint`, or the name of a shipped one
            (:data:`NAMED_CHECKPOINTS`: ``"digits"``, ``"generalist"``).
        model: the model to optimise; needed by (and only by) the rules built on the model's structure
            (``gradmetanet``, ``weightspace``), which are rebuilt for it: an MLP of any widths works
            with a checkpoint meta-trained on another width (input / output neurons are encoded by
            their relative position).

    Raises:
        ValueError: not a learned-optimizer checkpoint; a structured rule without ``model``; the
            meta-parameters do not fit the rule rebuilt for ``model`` (names the first mismatch).
    """
    path = _resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"gradmeta.lopt: learned-optimizer checkpoint {path} does not exist")
    blob = safe_torch_load(path, "learned-optimizer checkpoint")
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT or blob.get("kind") not in _KINDS:
        raise ValueError(f"gradmeta.lopt: {path} is not a learned-optimizer checkpoint ({CHECKPOINT_FORMAT}, "
                         f"kinds {sorted(_KINDS)})")
    cls = _KINDS[blob["kind"]]
    if cls in _FLAT_KINDS:
        lo = cls(**blob["config"])
    elif model is None:
        raise ValueError(f"gradmeta.lopt: {path} holds a {blob['kind']!r} learned optimizer, which reads more than "
                         "p.grad and is built for the model it optimises: use GradientSetOptimizer.from_checkpoint("
                         "model, loss_fn, path), or load_checkpoint(path, model=model)")
    else:
        lo = cls(model, **blob["config"])
    expected = lo.init_meta(0)
    if set(blob["meta"]) != set(expected):
        raise ValueError(f"gradmeta.lopt: {path}: meta-parameters {sorted(blob['meta'])} do not match "
                         f"{blob['kind']} ({sorted(expected)})")
    for k, v in expected.items():
        if blob["meta"][k].shape != v.shape:
            raise ValueError(f"gradmeta.lopt: {path}: meta-parameter {k!r} has shape {tuple(blob['meta'][k].shape)}, "
                             f"but the {blob['kind']} rule built for this model needs {tuple(v.shape)} (a rule with "
                             "neuron_ids='learned' only fits models with the input and output sizes it was trained on)")
    return lo, dict(blob["meta"])


class _Bucket:
    """Parameters of one (param group, device, dtype, step count) stepped by one fused pass.

    Holds the flat state: ``momenta (rows, N)`` (6 rows, or the rule's ``moment_rows``) and ``second (N,)`` in the compute dtype (float32 for
    16-bit parameters); every parameter's ``optimizer.state[p]`` holds views into them and shares
    the bucket's ``step`` / ``skipped`` counters.
    """

    def __init__(self, params: list[Tensor], states: list[dict], cdtype: torch.dtype, rows: int = len(DECAYS)):
        self.params = params
        dev = params[0].device
        self.numels = [p.numel() for p in params]
        self.shapes = [p.shape for p in params]
        self.ids = torch.repeat_interleave(torch.arange(len(params), device=dev),
                                           torch.tensor(self.numels, device=dev))
        self.segments = segment_matrix(self.numels, cdtype, dev, mean=True)
        first = next((s for s in states if s), None)
        zero = torch.zeros((), dtype=torch.float64)
        self.step = first["step"].clone() if first else zero.clone()
        self.skipped = first["skipped"].clone() if first else zero.clone()
        self.momenta = torch.cat([s["momenta"].to(dev, cdtype).reshape(rows, -1) if s else
                                  torch.zeros(rows, n, dtype=cdtype, device=dev)
                                  for s, n in zip(states, self.numels)], 1)
        self.second = torch.cat([s["second"].to(dev, cdtype).reshape(-1) if s else
                                 torch.zeros(n, dtype=cdtype, device=dev) for s, n in zip(states, self.numels)])
        m_views = self.momenta.split(self.numels, 1)
        v_views = self.second.split(self.numels)
        for s, p, m, v in zip(states, params, m_views, v_views):
            s.clear()
            s.update(step=self.step, skipped=self.skipped, momenta=m.view(rows, *p.shape),
                     second=v.view(p.shape))


class LearnedOptimizer(torch.optim.Optimizer):
    """A meta-trained per-parameter learned optimizer, used like any ``torch.optim`` optimizer.

    ``step()`` reads ``p.grad`` (the gradient of the *mean* loss, after your own
    ``loss.backward()``: gradient clipping, accumulation and ``GradScaler`` work as with Adam) and
    applies one learned update to every parameter that has a dense gradient; parameters without a
    gradient (or with a sparse one) are skipped and keep their state. Per parameter group,

        ``θ ← θ·(1 − lr·weight_decay) − lr · u``

    with ``u`` the checkpoint rule's update. The default (``"generalist"``,
    :class:`~gradmeta.lopt.GeneralistRule` with ``lr_free``) is ``u = α(p)·d·(Adam's direction,
    rescaled and mixed with a fast and a slow momentum by a bounded learned per-entry correction)``,
    ``d`` a step size estimated during the run from the distance the parameters have travelled
    (one per parameter bucket), ``α(p)`` a learned schedule over the progress ``p = t / total_steps``
    that decays to zero over the last 30 % of the run: pass ``total_steps`` (the length of your
    run) so its schedule spans the run (``None``: no decay). The ``"digits"`` checkpoint
    (:class:`PerParamMLP`) is ``u = clip(α(e^{0.1 s}·m_sgd + λ d), ±max_update)`` with ``α, λ``
    and the MLP outputs ``d, s``. ``lr`` multiplies the learned step (``lr = 1``: the update the
    optimizer was meta-trained with; any ``torch.optim.lr_scheduler`` may change it,
    ``OneCycleLR`` with ``cycle_momentum=False`` as the rules have no momentum hyperparameter to
    cycle; ``lr = 0``: no movement). Parameters are stepped in buckets of one parameter group,
    device and dtype, each by one fused pass over all of its entries. State (six momenta and a
    second moment per entry, 7× the parameters; 9× for a generalist with ``lr_free``, which also
    keeps the starting point and a weighted gradient sum) is kept in float32 for 16-bit parameters and in
    the parameter dtype otherwise. A step whose update is not finite anywhere is skipped
    (parameters and state unchanged) and counted in :attr:`skipped_steps`.

    Args:
        params: an iterable of parameters or of param-group dicts (as every ``torch.optim`` optimizer).
        lr: multiplier on the learned step (default 1).
        weight_decay: decoupled weight decay coefficient (default 0).
        checkpoint: a file from :func:`save_checkpoint` or a shipped one by name (``"generalist"``,
            ``"digits"``); ``None`` loads :data:`DEFAULT_CHECKPOINT` (the generalist).
        total_steps: the length of your run. The generalist (default) conditions on the progress
            ``t / total_steps``; ``None`` keeps its progress at 0 (its start-of-training behaviour
            for the whole run). For a :class:`PerParamMLP` checkpoint the step count the rule sees
            is rescaled to ``t · H / total_steps`` (``H``, the horizon it was meta-trained on), so
            its learned schedule spans your run; ``None``: the raw step count.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1.0, weight_decay: float = 0.0,
                 checkpoint: str | os.PathLike | None = None, total_steps: int | None = None):
        if isinstance(params, nn.Module):
            raise TypeError("LearnedOptimizer takes parameters like every torch.optim optimizer: "
                            "LearnedOptimizer(model.parameters()), then loss.backward(); opt.step() "
                            "(it no longer takes the module itself)")
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise TypeError(f"LearnedOptimizer: {name} must be a number >= 0, got {value!r}"
                                + (" (pass the checkpoint by keyword: checkpoint=...)" if name == "lr" else ""))
        self.lo, meta = load_checkpoint(checkpoint)
        if not isinstance(self.lo, _FLAT_KINDS):
            raise ValueError(f"LearnedOptimizer: {checkpoint} holds a {type(self.lo).__name__}, which reads more than "
                             "p.grad: use GradientSetOptimizer.from_checkpoint(model, loss_fn, path)")
        self._meta_cpu = meta
        self._meta: dict = {}
        self._time_scale = 1.0
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(f"LearnedOptimizer: total_steps must be a positive integer, got {total_steps!r}")
        self._total_steps = total_steps
        if isinstance(self.lo, GeneralistRule):  # conditions on progress t / total_steps itself
            self.lo.total_steps = total_steps
        elif total_steps is not None:
            horizon = checkpoint_horizon(checkpoint)
            if horizon is None:
                raise ValueError(f"LearnedOptimizer: total_steps needs the meta-training horizon of {checkpoint}, "
                                 "which records none (no info['horizon'] and no spec next to it)")
            self._time_scale = horizon / total_steps
        self._buckets: dict = {}
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @property
    def skipped_steps(self) -> int:
        """Number of skipped steps (non-finite updates) so far."""
        return max((int(s["skipped"]) for s in self.state.values() if "skipped" in s), default=0)

    def _meta_for(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        key = (device, dtype)
        if key not in self._meta:
            self._meta[key] = {k: v.to(device=device, dtype=dtype) for k, v in self._meta_cpu.items()}
        return self._meta[key]

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._buckets = {}

    def _plan(self) -> list[tuple[dict, _Bucket]]:
        """The buckets of this step; regrouped only when the set of parameters with gradients changes."""
        with_grad = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]
                     if p.grad is not None and not p.grad.is_sparse]
        signature = tuple((gi, id(p)) for gi, p in with_grad)
        cached = self._buckets.get("plan")
        if cached is not None and cached[0] == signature:
            return cached[1]
        plan = []
        for gi, group in enumerate(self.param_groups):
            keyed: dict = {}
            for g, p in with_grad:
                if g != gi:
                    continue
                if not p.dtype.is_floating_point:
                    raise TypeError(f"LearnedOptimizer: a parameter of dtype {p.dtype} cannot be optimised")
                cdtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
                step = float(self.state[p]["step"]) if self.state[p] else 0.0
                keyed.setdefault((p.device, p.dtype, cdtype, step), []).append(p)
            for (_, _, cdtype, _), params in keyed.items():
                plan.append((group, _Bucket(params, [self.state[p] for p in params], cdtype,
                                            getattr(self.lo, "moment_rows", len(DECAYS)))))
        self._buckets = {"plan": (signature, plan)}
        return plan

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One learned update from the gradients in ``p.grad``.

        ``closure`` (optional, as in every ``torch.optim`` optimizer) re-evaluates the model: it
        should zero the gradients, compute the loss, call ``backward()`` and return the loss; it
        runs with gradients enabled before the update. Returns what the closure returned (``None``
        without a closure). A closure loss that is not finite (e.g. the mean over an empty batch)
        skips the update, like a non-finite update does, and counts it in :attr:`skipped_steps`.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan()
        if not plan:
            return loss
        if isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            for b in {id(b): b for _, b in plan}.values():
                b.skipped += 1
            return loss
        lo, results = self.lo, []
        for group, b in plan:
            cdtype = b.momenta.dtype
            params = torch.cat([p.reshape(-1) for p in b.params]).to(cdtype)
            grads = torch.cat([p.grad.reshape(-1) for p in b.params]).to(cdtype)
            if isinstance(lo, GeneralistRule):
                results.append(lo.flat_update(self._meta_for(params.device, cdtype), params, grads, b.momenta,
                                              b.second, b.step.to(cdtype), lr=float(group["lr"]),
                                              weight_decay=float(group["weight_decay"])))
                continue
            t = float(b.step) + 1
            results.append(fused_update(self._meta_for(params.device, cdtype), params, grads, b.momenta, b.second,
                                        t, t * self._time_scale, b.ids, b.segments, step_mult=lo.step_mult,
                                        max_update=lo.max_update, lr=float(group["lr"]),
                                        weight_decay=float(group["weight_decay"])))
        if not all(bool(ok) for *_, ok in results):  # not finite: parameters and state stay as they were
            for b in {id(b): b for _, b in plan}.values():
                b.skipped += 1
            return loss
        for (_, b), (new, m, v, _) in zip(plan, results):
            torch._foreach_copy_(b.params, [x.view(s) for x, s in zip(new.split(b.numels), b.shapes)])
            b.momenta.copy_(m)
            b.second.copy_(v)
            b.step += 1
        return loss

    def state_dict(self) -> dict:
        """``torch.optim`` state dict plus the learned optimizer (``"lopt": {"kind", "config", "meta"}``)."""
        sd = super().state_dict()
        sd["state"] = {k: {n: t.clone() for n, t in s.items()} for k, s in sd["state"].items()}
        kinds = {v: k for k, v in _KINDS.items()}
        sd["lopt"] = {"kind": kinds[type(self.lo)], "config": self.lo.config(),
                      "meta": {k: v.detach().clone() for k, v in self._meta_cpu.items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore parameter groups, per-parameter state (dtypes kept: float32 state of 16-bit
        parameters stays float32) and the learned optimizer's meta-parameters."""
        state_dict = dict(state_dict)
        lopt = state_dict.pop("lopt", None)
        saved_state = state_dict.get("state", {})
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved_state:
                # counters stay on the CPU (read by Python each step), moments go to the parameter's device
                self.state[p] = {k: v.to("cpu" if v.dim() == 0 else p.device).clone() for k, v in saved_state[i].items()}
        if lopt is not None:
            self.lo = _KINDS[lopt["kind"]](**lopt["config"])
            if isinstance(self.lo, GeneralistRule):
                self.lo.total_steps = self._total_steps
            self._meta_cpu = {k: v.detach().cpu().clone() for k, v in lopt["meta"].items()}
            self._meta = {}
        self._buckets = {}
