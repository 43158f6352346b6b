"""Data, parameter and model checks shared by the curvature operators and estimators."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterable

import torch
from torch import nn

from ..params import ParamLayout

Batch = tuple[object, torch.Tensor]


class CurvatureError(ValueError):
    """The model, loss or data cannot give the requested curvature; the message says which and why."""


def _is_inputs(x) -> bool:
    return isinstance(x, torch.Tensor) or (
        isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x))


def batches(data) -> list[Batch]:
    """Normalise ``data`` to a list of ``(inputs, targets)`` pairs.

    ``data`` is one pair (``inputs`` a tensor or a tuple of tensors, batch-first; ``targets`` a
    tensor) or an iterable of such pairs.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor) \
            and _is_inputs(data[0]):
        out = [tuple(data)]
    else:
        try:
            out = [tuple(b) for b in data]
        except TypeError as e:
            raise CurvatureError(f"data must be an (inputs, targets) pair or an iterable of pairs, "
                                 f"got {type(data).__name__}") from e
    for i, b in enumerate(out):
        if len(b) != 2 or not _is_inputs(b[0]) or not isinstance(b[1], torch.Tensor):
            raise CurvatureError(f"batch {i} of data is not an (inputs, targets) pair of tensors")
        if batch_size(b[0]) == 0:
            raise CurvatureError(f"batch {i} of data is empty (inputs of shape {tuple(_first(b[0]).shape)}); "
                                 "curvature needs at least one example")
        for what, t in (("inputs", b[0]), ("targets", b[1])):
            for x in (t,) if isinstance(t, torch.Tensor) else t:
                if x.is_floating_point() and not torch.isfinite(x).all():
                    raise CurvatureError(f"batch {i} of data: {what} of shape {tuple(x.shape)} contain NaN or "
                                         "infinite values")
    if not out:
        raise CurvatureError("data is empty")
    return out


def _first(inputs) -> torch.Tensor:
    return inputs if isinstance(inputs, torch.Tensor) else inputs[0]


def batch_size(inputs) -> int:
    return _first(inputs).shape[0]


def call_model(model: nn.Module, inputs) -> torch.Tensor:
    return model(inputs) if isinstance(inputs, torch.Tensor) else model(*inputs)


def to_device(inputs, device):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    return tuple(t.to(device) for t in inputs)


def mean_loss(model, loss_fn, inputs, targets, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and this batch's share ``Σ_b ℓ_b / total`` of the mean loss over all data."""
    outputs = call_model(model, inputs)
    losses = loss_fn(outputs, targets)
    if losses.ndim != 1 or losses.shape[0] != batch_size(inputs):
        raise CurvatureError(f"loss_fn must return per-example losses of shape (B,)=({batch_size(inputs)},), "
                             f"got shape {tuple(losses.shape)}; use reduction='none'")
    return outputs, losses.sum() / total


def trainable(model: nn.Module, names: Iterable[str] | None = None) -> tuple[list[nn.Parameter], ParamLayout]:
    """Trainable parameters (``requires_grad``) in ``named_parameters()`` order, or the given subset."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if names is not None:
        wanted = list(names)
        known = {n for n, _ in named}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise CurvatureError(f"unknown or frozen parameter names {unknown}; trainable: {sorted(known)}")
        named = [(n, p) for n, p in named if n in set(wanted)]
    if not named:
        raise CurvatureError(f"{type(model).__name__} has no trainable parameters")
    return [p for _, p in named], ParamLayout(tuple(n for n, _ in named), tuple(p.shape for _, p in named))


def layer_groups(layout: ParamLayout) -> dict[str, list[str]]:
    """Group parameter names by owning module (``"0.weight"`` -> ``"0"``), in order."""
    groups: dict[str, list[str]] = {}
    for n in layout.names:
        groups.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
    return groups


_BN = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT = (nn.modules.dropout._DropoutNd,)


@contextlib.contextmanager
def checked(model: nn.Module, eval_batchnorm: bool = False):
    """Refuse BatchNorm in train mode (or switch it to eval if asked); warn on active dropout.

    BatchNorm in train mode mixes the examples of a batch, so the curvature of the mean loss over
    an iterable of batches would depend on how the data is split.
    """
    switched = []
    for name, m in model.named_modules():
        if isinstance(m, _BN) and m.training:
            if not eval_batchnorm:
                raise CurvatureError(
                    f"module {name!r} ({type(m).__name__}) is in train mode: batch statistics mix "
                    f"examples, so the curvature depends on the batch split. Call model.eval() or "
                    f"pass eval_batchnorm=True to use running statistics.")
            switched.append(m)
        if isinstance(m, _DROPOUT) and m.training and m.p > 0:
            warnings.warn(f"dropout module {name!r} ({type(m).__name__}, p={m.p}) is active: every "
                          f"product sees a different random mask; call model.eval() for a fixed "
                          f"operator", RuntimeWarning, stacklevel=3)
    for m in switched:
        m.eval()
    try:
        yield
    finally:
        for m in switched:
            m.train()
