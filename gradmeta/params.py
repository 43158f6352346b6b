"""``ParamLayout``: named parameters ``{name: tensor}`` laid out as one flat vector.

Parameters are keyed by their ``named_parameters()`` names everywhere in gradmeta (gradients, HVP
vectors, per-weight readouts, learned-optimizer updates). Code that needs one flat vector
(curvature operators, fused optimizer updates) goes through one layout, so the order, the shapes
and the checks live in a single place::

    layout = ParamLayout.of(dict(model.named_parameters()))
    flat = layout.flatten(grads)              # (P,)
    grads_again = layout.unflatten(flat)      # {name: param.shape}, views into flat
    stacked = layout.flatten(per_example, lead=1)   # {name: (B, *shape)} -> (B, P)
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ParamLayout"]


@dataclass(frozen=True)
class ParamLayout:
    """Flat layout of named tensors: ``names`` in order, each flattened and concatenated.

    Attributes:
        names: tensor names, in flat order.
        shapes: their shapes (without leading axes).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor], lead: int = 0) -> "ParamLayout":
        """The layout of ``tensors`` in their mapping order; ``lead`` leading axes are not part of
        the shapes (e.g. ``lead=1`` for a stack of per-example or per-particle tensors)."""
        return cls(tuple(tensors), tuple(torch.Size(v.shape[lead:]) for v in tensors.values()))

    @classmethod
    def of_module(cls, module: torch.nn.Module, trainable_only: bool = True) -> "ParamLayout":
        """The layout of ``module.named_parameters()`` (only ``requires_grad`` ones by default)."""
        return cls.of({n: p for n, p in module.named_parameters() if p.requires_grad or not trainable_only})

    @property
    def numels(self) -> list[int]:
        """Number of entries of each tensor, in ``names`` order."""
        return [s.numel() for s in self.shapes]

    @property
    def size(self) -> int:
        """``P``, the length of the flat vector."""
        return sum(self.numels)

    def slices(self) -> dict[str, slice]:
        """``{name: slice}`` of each tensor in the flat vector."""
        out, start = {}, 0
        for name, n in zip(self.names, self.numels):
            out[name] = slice(start, start + n)
            start += n
        return out

    def check(self, tensors: Mapping[str, Tensor], lead: int = 0) -> None:
        """Raise ``KeyError`` / ``ValueError`` naming the entry when ``tensors`` does not fit the layout."""
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in set(self.names)]
        if missing or extra:
            raise KeyError(f"tensor names do not match the layout: missing {missing}, unexpected {extra}")
        for n, s in zip(self.names, self.shapes):
            if tuple(tensors[n].shape[lead:]) != tuple(s):
                raise ValueError(f"entry {n!r} has shape {tuple(tensors[n].shape)}, the layout expects "
                                 f"{'(' + '*lead, ' if lead else '('}{', '.join(map(str, s))})")

    def flatten(self, tensors: Mapping[str, Tensor], lead: int = 0) -> Tensor:
        """``{name: (*lead_shape, *shape)}`` -> ``(*lead_shape, P)``; the keys must be exactly ``names``."""
        self.check(tensors, lead)
        if not self.names:
            raise ValueError("cannot flatten an empty layout")
        return torch.cat([tensors[n].reshape(*tensors[n].shape[:lead], -1) for n in self.names], -1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``(*lead_shape, P)`` -> ``{name: (*lead_shape, *shape)}`` (views into ``flat`` when it is contiguous)."""
        if flat.shape[-1] != self.size:
            raise ValueError(f"flat vector has {flat.shape[-1]} entries, the layout has {self.size}")
        lead = flat.shape[:-1]
        return {n: t.view(tuple(lead) + tuple(s)) if t.is_contiguous() else t.reshape(tuple(lead) + tuple(s))
                for n, t, s in zip(self.names, flat.split(self.numels, -1), self.shapes)}

    def split(self, flat: Tensor) -> list[Tensor]:
        """``(*lead_shape, P)`` -> tensors ``(*lead_shape, *shape)`` in ``names`` order."""
        return list(self.unflatten(flat).values())
