"""PEFT LoRA adapters as factor pairs: :class:`LoraFactors`, :class:`Adapter`, :func:`load_adapter`.

One adapted layer is ``ΔW = s · U Vᵀ`` with ``U: n×r``, ``V: m×r`` and the scalar ``s`` from the
adapter config. ``U`` is the factor indexed by the *first* axis of the base layer's weight tensor,
``V`` by the (flattened) remaining axes, so that ``delta()`` has exactly the shape and layout of the
weight that PEFT's ``get_delta_weight`` returns:

=========================  ==========================  ==========================  ================
layer (PEFT class)         ``U``                       ``V``                       ``delta()``
=========================  ==========================  ==========================  ================
Linear                     ``lora_B`` (out×r)          ``lora_Aᵀ`` (in×r)          (out, in)
Linear, fan_in_fan_out     ``lora_Aᵀ`` (in×r)          ``lora_B`` (out×r)          (in, out)
Embedding                  ``lora_embedding_Aᵀ`` (N×r)  ``lora_embedding_B`` (d×r)  (N, d)
Conv1d/2d/3d (groups=1)    ``lora_B`` (out×r)          ``lora_A.flatten(1)ᵀ``       (out, in, *k)
=========================  ==========================  ==========================  ================

``(U, V) → (U R, V R⁻ᵀ)`` for any ``R ∈ GL(r)`` leaves ``delta()`` unchanged.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["LoraFactors", "Adapter", "natural_key", "AdapterFormatError"]

class AdapterFormatError(ValueError):
    """An adapter folder or file cannot be read or is not a LoRA adapter; the message names the file."""


def natural_key(name: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10`` (digit runs compare as integers)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA of one layer: ``delta() = scale · U Vᵀ`` reshaped to ``weight_shape``.

    Attributes:
        U: ``(n, r)``, the factor on the first axis of the weight tensor (see the module table).
        V: ``(m, r)``, the factor on the flattened other axes; ``m = prod(weight_shape[1:])``.
        scale: ``lora_alpha / r`` (``/ √r`` with rsLoRA), after ``rank_pattern`` / ``alpha_pattern``.
        weight_shape: shape of PEFT's delta weight, e.g. ``(out, in)`` or ``(out, in, kh, kw)``.
        kind: ``"linear"``, ``"embedding"`` or ``"conv"``.
        fan_in_fan_out: the layer stores its weight as ``(in, out)`` (GPT-2 ``Conv1D``).
    """

    U: Tensor
    V: Tensor
    scale: float
    weight_shape: tuple[int, ...]
    kind: str = "linear"
    fan_in_fan_out: bool = False

    def __post_init__(self):
        if self.U.dim() != 2 or self.V.dim() != 2 or self.U.shape[1] != self.V.shape[1]:
            raise ValueError(f"LoraFactors: U {tuple(self.U.shape)} and V {tuple(self.V.shape)} must be (n, r) and (m, r)")
        n, m = self.weight_shape[0], math.prod(self.weight_shape[1:])
        if (self.U.shape[0], self.V.shape[0]) != (n, m):
            raise ValueError(f"LoraFactors: U {tuple(self.U.shape)}, V {tuple(self.V.shape)} do not match "
                             f"weight_shape {self.weight_shape} (expected ({n}, r) and ({m}, r))")

    @property
    def rank(self) -> int:
        """``r``, the number of factor columns."""
        return self.U.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, m)``, the shape of the matrix ``U Vᵀ``."""
        return self.U.shape[0], self.V.shape[0]

    def delta(self) -> Tensor:
        """``scale · U Vᵀ`` reshaped to ``weight_shape``: PEFT's ``get_delta_weight``."""
        return (self.scale * (self.U @ self.V.T)).reshape(self.weight_shape)

    def matrix(self) -> Tensor:
        """``scale · U Vᵀ`` as an ``(n, m)`` matrix."""
        return self.scale * (self.U @ self.V.T)

    def to(self, *args, **kwargs) -> "LoraFactors":
        """A copy with ``U`` and ``V`` moved/cast like :meth:`torch.Tensor.to`."""
        return replace(self, U=self.U.to(*args, **kwargs), V=self.V.to(*args, **kwargs))

    def transform(self, R: Tensor) -> "LoraFactors":
        """``(U R, V R⁻ᵀ)`` for an invertible ``R`` (r×r); the delta is unchanged."""
        return replace(self, U=self.U @ R, V=self.V @ torch.linalg.inv(R).T)

    def pad_rank(self, r: int) -> "LoraFactors":
        """Append zero columns to ``U`` and ``V`` up to rank ``r``; the delta and ``scale`` are unchanged."""
        if r < self.rank:
            raise ValueError(f"pad_rank: target rank {r} is below the adapter's rank {self.rank}")
        pad = lambda X: torch.cat([X, X.new_zeros(X.shape[0], r - self.rank)], dim=1)
        return replace(self, U=pad(self.U), V=pad(self.V))


@dataclass(frozen=True)
class Adapter(Mapping):
    """A LoRA adapter: an immutable mapping ``module name -> LoraFactors`` in natural order.

    Attributes:
        factors: the adapted layers, keyed by module name (without ``base_model.model.``).
        config: the ``adapter_config.json`` contents (for diffusers layouts: ``{component: config}``).
        path: the folder it came from, if any.
        other: keys of the file that are not LoRA factors (DoRA magnitudes, LoRA biases,
            ``modules_to_save`` weights), name -> tensor; reported, never mixed into the factors.
    """

    factors: dict[str, LoraFactors]
    config: dict = field(default_factory=dict, repr=False)
    path: Path | None = None
    other: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "factors", {k: self.factors[k] for k in sorted(self.factors, key=natural_key)})

    @property
    def module_names(self) -> list[str]:
        """Adapted module names, naturally sorted (``layers.2`` before ``layers.10``)."""
        return list(self.factors)

    @property
    def ranks(self) -> dict[str, int]:
        """``{module: r}``."""
        return {k: f.rank for k, f in self.factors.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{module: (n, m)}``, the matrix shape of each ``U Vᵀ``."""
        return {k: f.shape for k, f in self.factors.items()}

    def __getitem__(self, name: str) -> LoraFactors:
        try:
            return self.factors[name]
        except KeyError:
            where = f" in {self.path}" if self.path else ""
            raise KeyError(f"no adapted module {name!r}{where}; modules: {', '.join(self.factors)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        return f"Adapter({len(self)} modules, rank {ranks[0] if len(ranks) == 1 else ranks}, path={self.path})"

    def deltas(self) -> dict[str, Tensor]:
        """``{module: delta()}``, each shaped like PEFT's delta weight."""
        return {k: f.delta() for k, f in self.factors.items()}

    def map(self, fn) -> "Adapter":
        """A new adapter with ``fn(name, LoraFactors) -> LoraFactors`` applied to every module."""
        return replace(self, factors={k: fn(k, f) for k, f in self.factors.items()})

    def to(self, *args, **kwargs) -> "Adapter":
        """A copy with every factor moved/cast like :meth:`torch.Tensor.to`."""
        return self.map(lambda _, f: f.to(*args, **kwargs))

    def transform(self, Rs: Mapping[str, Tensor]) -> "Adapter":
        """Apply ``R ∈ GL(r)`` per module (``{module: R}``); the deltas are unchanged."""
        return self.map(lambda k, f: f.transform(Rs[k]) if k in Rs else f)

    def pad_rank(self, r: int) -> "Adapter":
        """Zero-pad every module to rank ``r`` (same deltas)."""
        return self.map(lambda _, f: f.pad_rank(r))
