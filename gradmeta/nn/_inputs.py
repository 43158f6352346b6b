"""Neuron-space input of GradMetaNet: per datum, token and neuron, a few channels.

Every neuron space of a spec gets the activations ``a`` of the layers that *read* it (slices of
``A``) and the backprops ``δ`` of the layers that *write* it (slices of ``Δ``). For an MLP every
neuron has at most one of each; then the paper's format is used for all levels alike:
``(a, δ, has_a, has_δ)`` with a missing slot filled by repeating the other one (input neurons
have no ``δ``, output neurons no ``a``), so one embedding serves every level and every depth.
Other architectures (the transformer's residual stream is read and written by many layers) get
the raw channel list of each space *kind*, each kind with its own embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._spec import SymmetrySpec, SymmetrySpecError


@dataclass(frozen=True)
class SpaceInput:
    """Where the channels of one space come from: ``(module, offset)`` of its reads and writes."""

    reads: tuple[tuple[str, int], ...]
    writes: tuple[tuple[str, int], ...]
    biases: tuple[tuple[str, int], ...]


class NeuronLayout:
    """Bag order, embedding groups and channel sources derived once from a ``SymmetrySpec``.

    The bag is every space of the spec, concatenated in spec order (``N = Σ sizes``).
    """

    def __init__(self, spec: SymmetrySpec, weight_aware: bool = False, extra_channels: int = 0):
        self.spec = spec
        self.weight_aware = weight_aware
        self.extra_channels = extra_channels
        self.offsets: dict[str, tuple[int, int]] = {}
        n = 0
        for s in spec.spaces:
            self.offsets[s.name] = (n, n + s.size)
            n += s.size
        self.num_neurons = n
        self.sources: dict[str, SpaceInput] = {}
        for s in spec.spaces:
            reads = tuple((lm.module, _offset(spec, lm.in_spaces, s.name)) for lm in spec.layers
                          if s.name in lm.in_spaces)
            writes = tuple((lm.module, _offset(spec, lm.out_spaces, s.name)) for lm in spec.layers
                           if s.name in lm.out_spaces)
            biases = tuple((p, _offset(spec, axes[0], s.name)) for p, axes in spec.params
                           if len(axes) == 1 and s.name in axes[0])
            self.sources[s.name] = SpaceInput(reads, writes, biases)
        self.paired = all(len(v.reads) <= 1 and len(v.writes) <= 1 and len(v.biases) <= 1
                          for v in self.sources.values())
        # embedding group of every space, and the channel count of every group
        self.group_of: dict[str, str] = {}
        self.channels: dict[str, int] = {}
        for s in spec.spaces:
            src = self.sources[s.name]
            if self.paired:
                g, c = "neuron", 4 + int(weight_aware)
            else:
                g, c = s.kind, len(src.reads) + len(src.writes) + (len(src.biases) if weight_aware else 0)
            c += extra_channels
            if self.channels.setdefault(g, c) != c:
                raise SymmetrySpecError(
                    f"spaces of kind {g!r} have different numbers of input channels ({self.channels[g]} vs "
                    f"{c} for {s.name!r}); give them different kinds in the spec")
            self.group_of[s.name] = g

    def features(self, gs, params: dict[str, torch.Tensor] | None = None,
                 extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``{space_name: (B, T, n, c)}`` raw input channels of every space.

        Args:
            gs: a ``GradientSet`` holding every layer named in the spec.
            params: ``{param_name: tensor}`` (weight-aware only): biases / norm scales become
                per-neuron channels, broadcast over data and tokens.
            extra: ``{space_name: (B, T, n, k)}`` extra channels (``k = extra_channels``).
        """
        missing = [lm.module for lm in self.spec.layers if lm.module not in gs]
        if missing:
            raise SymmetrySpecError(f"the GradientSet lacks layers {missing} that the spec needs "
                                    f"(it has {gs.layer_names}); collect with layers=None")
        if self.weight_aware and params is None:
            raise ValueError("this network is weight-aware: pass params=dict(model.named_parameters())")
        out = {}
        for s in self.spec.spaces:
            src = self.sources[s.name]
            a = [_slice(gs[m].activations, o, s.size) for m, o in src.reads]
            d = [_slice(gs[m].backprops, o, s.size) for m, o in src.writes]
            ref = (a + d)[0]
            if self.paired:
                one, zero = torch.ones_like(ref), torch.zeros_like(ref)
                av = a[0] if a else d[0]
                dv = d[0] if d else a[0]
                chans = [av, dv, one if a else zero, one if d else zero]
            else:
                chans = a + d
            if self.weight_aware:
                bs = [params[p][o:o + s.size].to(ref).expand_as(ref) for p, o in src.biases]
                chans += bs if (bs or not self.paired) else [torch.zeros_like(ref)]
            if self.extra_channels:
                if extra is None or s.name not in extra:
                    raise ValueError(f"extra channels for space {s.name!r} are missing")
                e = extra[s.name]
                if e.shape[-1] != self.extra_channels or e.shape[-2] != s.size:
                    raise ValueError(f"extra[{s.name!r}] has shape {tuple(e.shape)}, expected "
                                     f"(B, T, {s.size}, {self.extra_channels})")
                out[s.name] = torch.cat([torch.stack(chans, -1), e.to(ref)], -1)
            else:
                out[s.name] = torch.stack(chans, -1)
        return out

    def positional(self, dim: int) -> dict[str, torch.Tensor]:
        """``{space_name: (dim,)}`` sinusoidal code of (position, group) of each space."""
        return {s.name: sinusoid(s.position, dim) + sinusoid(s.group, dim, phase=0.5)
                for s in self.spec.spaces}


def sinusoid(pos: int, dim: int, phase: float = 0.0) -> torch.Tensor:
    """``(dim,)`` transformer-style sinusoidal encoding of an integer position."""
    i = torch.arange(dim // 2, dtype=torch.float64)
    freq = torch.exp(-math.log(100.0) * 2 * i / max(dim, 2))
    ang = (pos + phase) * freq
    out = torch.zeros(dim, dtype=torch.float64)
    out[0:2 * len(i):2], out[1:2 * len(i):2] = ang.sin(), ang.cos()
    return out


def _offset(spec: SymmetrySpec, axis: tuple[str, ...], name: str) -> int:
    off = 0
    for s in axis:
        if s == name:
            return off
        off += spec.space(s).size
    raise KeyError(name)


def _slice(t: torch.Tensor, off: int, n: int) -> torch.Tensor:
    return t[..., off:off + n]
