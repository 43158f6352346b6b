"""``LearnedOptimizer``: a trained learned optimizer as a drop-in ``torch.optim.Optimizer``.

Checkpoint files (written by :func:`save_checkpoint`, read with ``torch.load(weights_only=True)``)
hold ``{"format", "kind", "config", "meta"}``: the optimizer class's constructor arguments and its
meta-parameters. The package ships one, ``checkpoints/lopt_digits.pt``, meta-trained by
``gradmeta run tasks/lopt_digits.toml``; the spec that produced it lies next to it
(``checkpoints/lopt_digits.toml``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from gradmeta.params import ParamLayout

from ._learned import DECAYS, PerParamMLP

__all__ = ["LearnedOptimizer", "save_checkpoint", "load_checkpoint", "DEFAULT_CHECKPOINT", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "gradmeta.lopt/1"
#: The checkpoint loaded by ``LearnedOptimizer(model)`` (meta-trained on the digits MLP task).
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "lopt_digits.pt"
_KINDS = {"per_param_mlp": PerParamMLP}


def save_checkpoint(path: str | os.PathLike, lo: PerParamMLP, meta: dict[str, Tensor], **info) -> Path:
    """Write ``lo``'s config and ``meta`` (plus scalar/string ``info``) to ``path`` atomically."""
    from gradmeta._io import atomic_write

    kind = {v: k for k, v in _KINDS.items()}[type(lo)]
    blob = {"format": CHECKPOINT_FORMAT, "kind": kind, "config": lo.config(),
            "meta": {k: v.detach().clone().cpu() for k, v in meta.items()}, "info": dict(info)}
    return atomic_write(path, lambda f: torch.save(blob, f))


def load_checkpoint(path: str | os.PathLike | None = None) -> tuple[PerParamMLP, dict[str, Tensor]]:
    """``(optimizer, meta)`` from a checkpoint file (default :data:`DEFAULT_CHECKPOINT`), ``weights_only``."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"gradmeta.lopt: learned-optimizer checkpoint {path} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT or blob.get("kind") not in _KINDS:
        raise ValueError(f"gradmeta.lopt: {path} is not a learned-optimizer checkpoint ({CHECKPOINT_FORMAT}, "
                         f"kinds {sorted(_KINDS)})")
    lo = _KINDS[blob["kind"]](**blob["config"])
    expected = set(lo.init_meta(0))
    if set(blob["meta"]) != expected:
        raise ValueError(f"gradmeta.lopt: {path}: meta-parameters {sorted(blob['meta'])} do not match "
                         f"{blob['kind']} ({sorted(expected)})")
    return lo, dict(blob["meta"])


class LearnedOptimizer(torch.optim.Optimizer):
    """A meta-trained optimizer for the parameters of ``model``.

    ``step(closure)`` calls ``closure()``, which must run the forward pass and return the
    per-example losses ``(B,)``; the optimizer backpropagates their mean (previous ``.grad`` are
    discarded), applies one learned update to every parameter with a gradient, and returns the
    mean loss (a detached ``()`` tensor). A step whose update is not finite is skipped and counted
    in :attr:`skipped_steps`.

    Args:
        model: the module to optimise; state is keyed by its ``named_parameters()`` names.
        checkpoint: a file from :func:`save_checkpoint`; ``None`` loads the shipped
            :data:`DEFAULT_CHECKPOINT` (meta-trained on a digits MLP).
    """

    def __init__(self, model: nn.Module, checkpoint: str | os.PathLike | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"LearnedOptimizer expects an nn.Module, got {type(model).__name__}")
        self.lo, meta = load_checkpoint(checkpoint)
        self.meta = {k: v.to(next(model.parameters()).device) for k, v in meta.items()}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = {p: n for n, p in named}
        self._seg, self._seg_key = None, None
        super().__init__([p for _, p in named], {})

    @property
    def skipped_steps(self) -> int:
        """Number of skipped steps (non-finite updates) so far."""
        return max((int(s["skipped"]) for s in self.state.values() if "skipped" in s), default=0)

    def _segments(self, params: list[nn.Parameter]) -> ParamLayout:
        key = tuple((self._names[p], p.shape) for p in params)
        if self._seg_key != key:
            self._seg = ParamLayout.of({self._names[p]: p.detach() for p in params})
            self._seg_key = key
        return self._seg

    def _init_state(self, params: list[nn.Parameter]) -> None:
        empty = [p for p in params if not self.state[p]]
        if not empty:
            return
        fresh = self.lo.init({self._names[p]: p.detach() for p in empty})
        counters = next((self.state[p] for p in params if self.state[p]), None)
        for p in empty:
            n = self._names[p]
            step = fresh.step if counters is None else counters["step"]
            skipped = fresh.skipped if counters is None else counters["skipped"]
            self.state[p].update(step=step.clone(), skipped=skipped.clone(), momenta=fresh.momenta[n],
                                 second=fresh.second[n])

    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One learned update; ``closure() -> (B,)`` per-example losses; returns their mean."""
        if closure is None:
            raise ValueError("LearnedOptimizer.step needs a closure returning per-example losses (B,)")
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        with torch.enable_grad():
            losses = closure()
            if not isinstance(losses, Tensor) or losses.dim() != 1:
                shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                raise ValueError(f"LearnedOptimizer.step: the closure must return per-example losses of shape "
                                 f"(B,), got {shape}")
            loss = losses.mean()
            loss.backward()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss.detach()
        with torch.no_grad():
            # all parameters as one flat vector: a few large ops instead of many per tensor
            self._init_state(params)
            seg, states = self._segments(params), [self.state[p] for p in params]
            new, momenta, second, step, skipped = self.lo.flat_update(
                self.meta, seg, torch.cat([p.reshape(-1) for p in params]),
                torch.cat([p.grad.reshape(-1) for p in params]),
                torch.cat([s["momenta"].reshape(len(DECAYS), -1) for s in states], 1),
                torch.cat([s["second"].reshape(-1) for s in states]), states[0]["step"], states[0]["skipped"],
                keep_if_not_finite=False)
            if skipped > states[0]["skipped"]:  # not finite: parameters and state stay as they were
                for s in states:
                    s["skipped"] = skipped
                return loss.detach()
            torch._foreach_copy_(params, list(seg.unflatten(new).values()))
            for s, m, v in zip(states, seg.unflatten(momenta).values(), seg.unflatten(second).values()):
                s.update(step=step, skipped=skipped, momenta=m, second=v)
        return loss.detach()

    def state_dict(self) -> dict:
        """``torch.optim`` state dict plus the learned optimizer (``"lopt": {"kind", "config", "meta"}``)."""
        sd = super().state_dict()
        sd["lopt"] = {"kind": "per_param_mlp", "config": self.lo.config(),
                      "meta": {k: v.detach().clone() for k, v in self.meta.items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the per-parameter state and the learned optimizer's meta-parameters."""
        state_dict = dict(state_dict)
        lopt = state_dict.pop("lopt", None)
        if lopt is not None:
            self.lo = _KINDS[lopt["kind"]](**lopt["config"])
            device = next(iter(self.meta.values())).device
            self.meta = {k: v.to(device) for k, v in lopt["meta"].items()}
        super().load_state_dict(state_dict)
