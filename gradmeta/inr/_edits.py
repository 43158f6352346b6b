"""Image edits: image → image functions in a small registry (dilation, erosion, contrast).

An edit takes images ``(N, C, H, W)`` in ``[0, 1]`` and returns the edited images, same shape.
Add one with ``@register_edit("name")``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["EDITS", "register_edit", "get_edit", "apply_edit", "dilate", "erode", "contrast"]

EDITS: dict[str, Callable[[Tensor], Tensor]] = {}


def register_edit(name: str) -> Callable:
    """Decorator registering ``fn(images (N, C, H, W)) -> (N, C, H, W)`` as edit ``name``."""
    def deco(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        if name in EDITS and EDITS[name] is not fn:
            raise ValueError(f"edit {name!r} is already registered by {EDITS[name].__module__}")
        EDITS[name] = fn
        return fn
    return deco


def get_edit(name: str) -> Callable[[Tensor], Tensor]:
    """The edit registered as ``name``."""
    if name not in EDITS:
        raise KeyError(f"unknown edit {name!r}; registered: {', '.join(sorted(EDITS))}")
    return EDITS[name]


def apply_edit(name: str, images: Tensor) -> Tensor:
    """Apply edit ``name`` to ``(N, C, H, W)`` images; checks the shape is kept."""
    if images.dim() != 4:
        raise ValueError(f"edit {name!r}: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    out = get_edit(name)(images)
    if out.shape != images.shape:
        raise ValueError(f"edit {name!r} returned shape {tuple(out.shape)} for input {tuple(images.shape)}")
    return out


def _ndimage(op, images: Tensor, size: int) -> Tensor:
    x = images.detach().cpu().numpy()
    out = op(x, size=(1, 1, size, size), mode="nearest")
    return torch.from_numpy(np.ascontiguousarray(out)).to(images)


@register_edit("dilation")
def dilate(images: Tensor, size: int = 3) -> Tensor:
    """Grey-scale dilation (max filter) with a ``size × size`` square, per channel (scipy.ndimage)."""
    from scipy.ndimage import grey_dilation
    return _ndimage(grey_dilation, images, size)


@register_edit("erosion")
def erode(images: Tensor, size: int = 3) -> Tensor:
    """Grey-scale erosion (min filter) with a ``size × size`` square, per channel (scipy.ndimage)."""
    from scipy.ndimage import grey_erosion
    return _ndimage(grey_erosion, images, size)


@register_edit("contrast")
def contrast(images: Tensor, factor: float = 1.5) -> Tensor:
    """``clip(0.5 + factor·(x − 0.5), 0, 1)``: stretch pixel values about mid-grey."""
    return (0.5 + factor * (images - 0.5)).clamp(0, 1)
