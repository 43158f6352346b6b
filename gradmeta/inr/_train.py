"""Training and evaluating INR editors with the rendered-image loss."""
from __future__ import annotations

import time

import torch
from torch import Tensor

from .._training import minibatch_train
from ._editors import INREditor
from ._features import FeatureSet
from ._fit import render

__all__ = ["fit_editor", "evaluate_editor", "high_pass"]

_BINOMIAL = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16


def high_pass(images: Tensor) -> Tensor:
    """``images − blur(images)`` for ``(N, C, H, W)`` images; blur: 3×3 binomial, replicate padding, per channel.

    Zero on constant images; its mean square is the smoothness penalty of :func:`fit_editor`.
    """
    if images.dim() != 4:
        raise ValueError(f"high_pass expects (N, C, H, W) images, got shape {tuple(images.shape)}")
    C = images.shape[1]
    k = _BINOMIAL.to(images).expand(C, 1, 3, 3)
    return images - torch.nn.functional.conv2d(torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"),
                                               k, groups=C)


def _batches(sets, idx):
    return None if sets is None else [sets[i] for i in idx.tolist()]


def fit_editor(editor: INREditor, params: dict[str, Tensor], targets: Tensor, *, steps: int = 500,
                 batch_size: int = 32, lr: float = 1e-3, seed: int = 0, progress: bool = False,
                 sets: list[FeatureSet] | None = None, smoothness: float = 0.0) -> dict:
    """Train ``editor`` in place so that ``render(θ + Δθ)`` matches ``targets`` (the loop under
    :func:`gradmeta.inr.train_editor`).

    Args:
        editor: an :class:`INREditor` (calibrated here on ``params``).
        params: ``{name: (N, ...)}`` training INRs.
        targets: ``(N, C, H, W)`` edited images; the loss is their pixel MSE to the edited INRs'
            renderings on the ``H × W`` pixel grid, averaged over the batch.
        steps, batch_size, lr: Adam, batches drawn uniformly with ``seed``.
        sets: precomputed ``editor.aux_sets(params)`` (computed here when ``None``).
        smoothness: weight λ ≥ 0 of a penalty ``λ · mean(high_pass(rendering)²)`` on the rendered
            edit (:func:`high_pass`), against speckle. ``0`` (default) leaves the loss the pixel
            MSE (bit for bit the loss without the option); with λ > 0 the logged ``loss``
            includes the penalty.

    Returns:
        ``{"loss": [per-step training MSE], "seconds": float, "sets_seconds": float}``.
    """
    if not smoothness >= 0:
        raise ValueError(f"fit_editor: smoothness must be >= 0, got {smoothness}")
    editor.calibrate(params)
    t0 = time.perf_counter()
    if sets is None:
        with torch.no_grad():
            sets = editor.aux_sets(params)
    sets_seconds = time.perf_counter() - t0
    size = tuple(targets.shape[-2:])

    def batch_loss(idx: Tensor) -> Tensor:
        p = {k: v[idx] for k, v in params.items()}
        out = render(editor.edit(p, _batches(sets, idx)), size, editor.omega0)
        mse = (out - targets[idx]).square().mean()
        return mse + smoothness * high_pass(out).square().mean() if smoothness else mse

    t0 = time.perf_counter()
    losses = minibatch_train(editor, batch_loss, targets.shape[0], steps=steps, batch_size=batch_size, lr=lr,
                             seed=seed, sampling="uniform", log_every=1, progress=progress,
                             desc=f"train editor ({editor.features})")["loss"]
    return {"loss": losses, "seconds": time.perf_counter() - t0, "sets_seconds": sets_seconds}


@torch.no_grad()
def evaluate_editor(editor: INREditor | None, params: dict[str, Tensor], targets: Tensor, *,
                    batch_size: int = 128, sets: list[FeatureSet] | None = None) -> Tensor:
    """Per-INR pixel MSE ``(N,)`` of the edited INRs' renderings vs ``targets`` (``editor=None``: no edit)."""
    size = tuple(targets.shape[-2:])
    out = []
    N = targets.shape[0]
    if editor is not None and sets is None:
        sets = editor.aux_sets(params)
    for a in range(0, N, batch_size):
        idx = torch.arange(a, min(a + batch_size, N))
        p = {k: v[idx] for k, v in params.items()}
        if editor is not None:
            p = editor.edit(p, _batches(sets, idx))
        omega0 = editor.omega0 if editor is not None else 30.0
        out.append((render(p, size, omega0) - targets[idx]).square().flatten(1).mean(1))
    return torch.cat(out)
