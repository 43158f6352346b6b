"""``ImageData``: a labelled image set held in memory, and the embedded scikit-learn digits."""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ImageData", "load_digits", "stratified_split"]


@dataclass(frozen=True, eq=False)
class ImageData(torch.utils.data.Dataset):
    """A labelled image set held in memory (no downloads, no lazy file access).

    Attributes:
        images: float tensor ``(N, C, H, W)``, pixel values in ``[0, 1]``.
        labels: int64 tensor ``(N,)``, values in ``0 .. len(classes) - 1``.
        classes: class names; ``len(classes)`` is the number of classes.
        name: where the data came from, e.g. ``"digits/train"`` or ``"cifar10/test"``.

    Indexing (``data[i]``) returns ``(image (C, H, W), label ())`` so the object works with
    ``torch.utils.data.DataLoader``; :meth:`batches` is a faster loop for in-memory training.
    """

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"ImageData {self.name!r}: images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"ImageData {self.name!r}: labels must have shape ({self.images.shape[0]},) to match images "
                f"{tuple(self.images.shape)}, got {tuple(self.labels.shape)}"
            )
        if self.labels.dtype != torch.int64:
            raise ValueError(f"ImageData {self.name!r}: labels must be int64, got {self.labels.dtype}")
        if self.labels.numel() and not (0 <= int(self.labels.min()) and int(self.labels.max()) < len(self.classes)):
            raise ValueError(
                f"ImageData {self.name!r}: labels span {int(self.labels.min())}..{int(self.labels.max())} "
                f"but there are {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, images={tuple(self.images.shape)} {self.images.dtype}, "
            f"classes={len(self.classes)})"
        )

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def flat(self) -> Tensor:
        """Images flattened per example: ``(N, C·H·W)`` (a view when possible)."""
        return self.images.reshape(len(self), -1)

    def tensors(self, flatten: bool = False) -> tuple[Tensor, Tensor]:
        """``(inputs, labels)``; inputs ``(N, C, H, W)``, or ``(N, C·H·W)`` when ``flatten``."""
        return (self.flat() if flatten else self.images), self.labels

    def resize(self, size: int | tuple[int, int]) -> ImageData:
        """Downsample (or upsample) every image to ``size`` by area averaging.

        Area averaging (``adaptive_avg_pool2d``) keeps values in ``[0, 1]`` and is exact block
        averaging when the size divides evenly (28→7, 32→8); e.g. ``resize(8)`` gives the
        8×8 inputs of the learned-optimizer tasks.
        """
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"ImageData.resize: size must be a positive int or (H, W), got {size!r}")
        if hw == tuple(self.images.shape[2:]):
            return self
        x = F.adaptive_avg_pool2d(self.images, hw)
        return ImageData(x.contiguous(), self.labels, self.classes, f"{self.name}@{hw[0]}x{hw[1]}")

    def grayscale(self) -> ImageData:
        """One channel: the mean over channels (``(N, 1, H, W)``); unchanged if already one channel."""
        if self.images.shape[1] == 1:
            return self
        return ImageData(self.images.mean(1, keepdim=True), self.labels, self.classes, f"{self.name}/gray")

    def to(self, *args, **kwargs) -> ImageData:
        """Move/cast the images like ``Tensor.to`` (labels follow the device, stay int64)."""
        images = self.images.to(*args, **kwargs)
        return ImageData(images, self.labels.to(images.device), self.classes, self.name)

    def subset(self, index: Tensor | Sequence[int] | slice) -> ImageData:
        """The examples at ``index`` (int tensor, list of ints or slice), in that order."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return ImageData(self.images[index], self.labels[index], self.classes, self.name)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        flatten: bool = False,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the data in minibatches ``(x (b, C, H, W) or (b, C·H·W), y (b,))``.

        Args:
            batch_size: examples per batch (the last one may be smaller unless ``drop_last``).
            shuffle: visit examples in a random order drawn from ``generator``.
            generator: a seeded ``torch.Generator`` for reproducible order.
            drop_last: skip a final incomplete batch.
            flatten: yield flattened inputs ``(b, C·H·W)``.
        """
        if batch_size < 1:
            raise ValueError(f"ImageData.batches: batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        x_all = self.flat() if flatten else self.images
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size].to(x_all.device)
            yield x_all[idx], self.labels[idx]


def _hash_key(seed: int, i: int) -> int:
    """A pseudo-random key that never changes across library versions (unlike RNG streams)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")


def stratified_split(labels: Tensor, test_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic stratified split of ``range(len(labels))`` into ``(train_idx, test_idx)``.

    Within each class the examples are ordered by a hash of ``(seed, index)`` and the first
    ``round(test_fraction · n_class)`` go to the test part, so the split depends only on the
    labels, the fraction and the seed — not on torch/numpy random-number streams.

    Args:
        labels: int tensor ``(N,)``.
        test_fraction: in ``[0, 1]``.
        seed: selects a different split.

    Returns:
        Two sorted int64 tensors of indices that partition ``0..N-1``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"stratified_split: test_fraction must be in [0, 1], got {test_fraction}")
    test: list[int] = []
    lab = labels.tolist()
    for c in sorted(set(lab)):
        members = sorted((i for i, y in enumerate(lab) if y == c), key=lambda i: _hash_key(seed, i))
        test.extend(members[: round(test_fraction * len(members))])
    is_test = torch.zeros(len(lab), dtype=torch.bool)
    is_test[torch.as_tensor(test, dtype=torch.long)] = True
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load_digits  # imported lazily: sklearn is slow to import

    raw = _sk_load_digits()
    images, labels = np.asarray(raw.images, dtype=np.float64), np.asarray(raw.target, dtype=np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by every call: keep it intact
    return images, labels


def load_digits(
    split: str = "train", *, test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> ImageData:
    """The scikit-learn digits (1797 grey 8×8 images, 10 classes), shipped inside scikit-learn.

    Pixel values 0..16 are scaled to ``[0, 1]``. The train/test split is stratified and
    deterministic (see :func:`stratified_split`); ``split="all"`` returns every example in the
    original order.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        test_fraction: share of each class held out for ``"test"``.
        seed: chooses the split.
        dtype: floating dtype of the images.

    Returns:
        :class:`ImageData` with images ``(N, 1, 8, 8)``; N = 1438 / 359 / 1797 at the defaults.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"load_digits: split must be 'train', 'test' or 'all', got {split!r}")
    raw_images, raw_labels = _sklearn_digits()
    images = torch.from_numpy(raw_images / 16.0).to(dtype).unsqueeze(1)
    labels = torch.from_numpy(raw_labels.copy())
    data = ImageData(images, labels, tuple(str(c) for c in range(10)), "digits")
    if split == "all":
        return data
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    part = data.subset(train_idx if split == "train" else test_idx)
    return ImageData(part.images, part.labels, part.classes, f"digits/{split}")
