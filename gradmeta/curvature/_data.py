"""Data, parameter and model checks shared by the curvature operators and estimators."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Iterable

import torch
from torch import nn

from ..params import ParamLayout

Batch = tuple[object, torch.Tensor]


class CurvatureError(ValueError):
    """The model, loss or data cannot give the requested curvature; the message says which and why."""


def _is_inputs(x) -> bool:
    if isinstance(x, Mapping):
        return len(x) > 0 and all(isinstance(t, torch.Tensor) or t is None for t in x.values())
    return isinstance(x, torch.Tensor) or (
        isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x))


def _is_targets(y) -> bool:
    return isinstance(y, torch.Tensor) or _is_inputs(y)


def batches(data) -> list[Batch]:
    """Normalise ``data`` to a list of ``(inputs, targets)`` pairs.

    ``data`` is one pair or an iterable of pairs. ``inputs`` is a batch-first tensor, a tuple of
    them (positional arguments) or a dict (keyword arguments, e.g. ``input_ids`` and
    ``attention_mask``); ``targets`` a tensor, or a tuple / dict of tensors. A pair whose inputs
    and targets are both tuples of tensors reads like two batches: pass it as ``[(inputs, targets)]``.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and (
            (isinstance(data[1], torch.Tensor) and _is_inputs(data[0]))
            or (isinstance(data[0], Mapping) and _is_targets(data[1]))):
        out = [tuple(data)]
    elif isinstance(data, tuple) and len(data) == 2 and all(
            isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(t, torch.Tensor) for t in b) for b in data):
        raise CurvatureError(
            "data is a pair of tuples of tensors, which reads both as one (inputs, targets) pair with tuple "
            "inputs and targets and as two batches: pass [(inputs, targets)] for one batch or a list of batches")
    else:
        try:
            out = [tuple(b) for b in data]
        except TypeError as e:
            raise CurvatureError(f"data must be an (inputs, targets) pair or an iterable of pairs, "
                                 f"got {type(data).__name__}") from e
    for i, b in enumerate(out):
        if len(b) != 2 or not _is_inputs(b[0]) or not _is_targets(b[1]):
            raise CurvatureError(f"batch {i} of data is not an (inputs, targets) pair of tensors")
        if batch_size(b[0]) == 0:
            raise CurvatureError(f"batch {i} of data is empty (inputs of shape {tuple(_first(b[0]).shape)}); "
                                 "curvature needs at least one example")
        for what, t in (("inputs", b[0]), ("targets", b[1])):
            for x in _leaves(t):
                if x.is_floating_point() and not torch.isfinite(x).all():
                    raise CurvatureError(f"batch {i} of data: {what} of shape {tuple(x.shape)} contain NaN or "
                                         "infinite values")
    if not out:
        raise CurvatureError("data is empty")
    return out


def _leaves(t) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(t) if isinstance(x, torch.Tensor)]


def _first(inputs) -> torch.Tensor:
    return _leaves(inputs)[0]


def batch_size(inputs) -> int:
    return _first(inputs).shape[0]


def call_model(model: nn.Module, inputs):
    """Run the model with sdpa attention on its math backend: the fused CPU/flash kernels have no
    double backward, which Hessian products need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        if isinstance(inputs, Mapping):
            return model(**inputs)
        return model(inputs) if isinstance(inputs, torch.Tensor) else model(*inputs)


def output_tensor(outputs) -> tuple[torch.Tensor, object]:
    """``(f, rebuild)``: the model's prediction tensor (logits of an output object, first item of a
    tuple) and a function giving the same output structure with ``f`` replaced."""
    if isinstance(outputs, torch.Tensor):
        return outputs, lambda f: f
    if hasattr(outputs, "logits") and isinstance(outputs.logits, torch.Tensor):
        if isinstance(outputs, Mapping):
            return outputs.logits, lambda f: type(outputs)(**{**outputs, "logits": f})
        return outputs.logits, lambda f: _replace_attr(outputs, "logits", f)
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0], lambda f: type(outputs)([f, *outputs[1:]])
    raise CurvatureError(f"cannot find the model's prediction in {type(outputs).__name__}: expected a tensor, "
                         "an object with .logits or a tuple whose first item is a tensor")


def _replace_attr(obj, name, value):
    import copy
    new = copy.copy(obj)
    setattr(new, name, value)
    return new


def to_device(inputs, device):
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)


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
