"""Tensor-level helpers for task code: 8×8 flattened image inputs and language-model batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._images import ImageData

__all__ = ["downsample_flatten", "lm_batches"]


def downsample_flatten(X: Tensor | ImageData, size: int | tuple[int, int] = 8) -> Tensor:
    """Downsample images by area averaging and flatten each one to a vector.

    This is the input of the learned-optimizer inner tasks (MLPs on 8×8 Fashion-MNIST/CIFAR).
    Averaging uses ``adaptive_avg_pool2d``: output pixel ``(i, j)`` is the mean of input rows
    ``floor(i·H/h) .. ceil((i+1)·H/h) - 1`` and the same for columns, i.e. exact block means
    when ``h`` divides ``H`` (32→8, 28→7) and slightly overlapping windows otherwise (28→8).
    It is the same operation as :meth:`ImageData.resize` followed by :meth:`ImageData.flat`.

    Args:
        X: images ``(N, H, W)`` or ``(N, C, H, W)``, or an :class:`ImageData`. ``uint8`` pixels
            are scaled to ``[0, 1]`` (÷255) and returned as float32; floating images keep their
            dtype and values; other integer dtypes are refused (their scale is unknown).
        size: output side ``h = w = size``, or ``(h, w)``.

    Returns:
        Float tensor ``(N, C·h·w)`` (``C = 1`` for ``(N, H, W)`` input), channel-major within a row.

    Raises:
        ValueError: wrong number of dimensions, non-positive size, or a non-uint8 integer dtype.
    """
    if isinstance(X, ImageData):
        X = X.images
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"downsample_flatten: size must be a positive int or (h, w), got {size!r}")
    if X.dim() not in (3, 4):
        raise ValueError(f"downsample_flatten: images must be (N, H, W) or (N, C, H, W), got shape {tuple(X.shape)}")
    if X.dtype == torch.uint8:
        X = X.to(torch.float32) / 255.0
    elif not X.is_floating_point():
        raise ValueError(f"downsample_flatten: expected uint8 or floating images, got {X.dtype}")
    if X.dim() == 3:
        X = X.unsqueeze(1)
    if tuple(X.shape[2:]) != hw:
        X = F.adaptive_avg_pool2d(X, hw)
    return X.reshape(X.shape[0], -1).contiguous()


def lm_batches(
    tokens: Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random windows of a token stream for next-token prediction.

    Window starts are drawn uniformly (with replacement) from every position that leaves room
    for ``seq_len + 1`` tokens, by one call ``torch.randint(0, N - seq_len, (batch_size,),
    generator=generator)``, so a seeded generator gives the same batch everywhere.

    Args:
        tokens: 1-D integer tensor ``(N,)`` of token ids, e.g. ``TextCorpus.train``.
        batch_size: number of windows ``B``.
        seq_len: window length ``T``; needs ``N >= T + 1``.
        generator: seeded ``torch.Generator`` for reproducible batches.

    Returns:
        ``(inputs, targets)``, both int64 ``(B, T)``: ``inputs[b] = tokens[s_b : s_b + T]`` and
        ``targets[b] = tokens[s_b + 1 : s_b + T + 1]`` (targets shifted by one).

    Raises:
        ValueError: ``tokens`` not 1-D integer, ``batch_size``/``seq_len`` < 1, or a stream too
            short for one window (the message gives both lengths).
    """
    if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"lm_batches: tokens must be a 1-D integer tensor, got {tokens.dtype} of shape {tuple(tokens.shape)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"lm_batches: batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    n_starts = tokens.numel() - seq_len
    if n_starts < 1:
        raise ValueError(f"lm_batches: seq_len={seq_len} needs at least {seq_len + 1} tokens, the stream has {tokens.numel()}")
    starts = torch.randint(0, n_starts, (batch_size,), generator=generator)
    windows = tokens.to(torch.int64).unfold(0, seq_len + 1, 1)[starts.to(tokens.device)]  # (B, T + 1), a copy
    return windows[:, :-1], windows[:, 1:]
