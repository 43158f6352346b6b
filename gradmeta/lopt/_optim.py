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

from ._learned import LOState, PerParamMLP

__all__ = ["LearnedOptimizer", "save_checkpoint", "load_checkpoint", "DEFAULT_CHECKPOINT", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "gradmeta.lopt/1"
#: The checkpoint loaded by ``LearnedOptimizer(model)`` (meta-trained on the digits MLP task).
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "lopt_digits.pt"
_KINDS = {"per_param_mlp": PerParamMLP}


def save_checkpoint(path: str | os.PathLike, lo: PerParamMLP, meta: dict[str, Tensor], **info) -> Path:
    """Write ``lo``'s config and ``meta`` (plus scalar/string ``info``) to ``path`` atomically."""
    from gradmeta.run import atomic_write

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
        super().__init__([p for _, p in named], {})

    @property
    def skipped_steps(self) -> int:
        """Number of skipped steps (non-finite updates) so far."""
        return max((int(s["skipped"]) for s in self.state.values() if "skipped" in s), default=0)

    def _lo_state(self, params: list[nn.Parameter]) -> LOState:
        empty = [p for p in params if not self.state[p]]
        fresh = self.lo.init({self._names[p]: p.detach() for p in empty}) if empty else None
        for p in empty:
            n = self._names[p]
            self.state[p].update(step=fresh.step.clone(), skipped=fresh.skipped.clone(),
                                 momenta=fresh.momenta[n], second=fresh.second[n])
        s0 = self.state[params[0]]
        return LOState(s0["step"], {self._names[p]: self.state[p]["momenta"] for p in params},
                       {self._names[p]: self.state[p]["second"] for p in params}, s0["skipped"])

    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """One learned update; ``closure() -> (B,)`` per-example losses; returns their mean."""
        if closure is None:
            raise ValueError("LearnedOptimizer.step needs a closure returning per-example losses (B,)")
        self.zero_grad(set_to_none=True)
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
            state = self._lo_state(params)
            named = {self._names[p]: p.detach() for p in params}
            new, state = self.lo.update(self.meta, {self._names[p]: p.grad for p in params}, state, named)
            for p in params:
                n = self._names[p]
                p.copy_(new[n])
                self.state[p].update(step=state.step, skipped=state.skipped, momenta=state.momenta[n],
                                     second=state.second[n])
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
