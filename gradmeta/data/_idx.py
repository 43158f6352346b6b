"""Readers for the IDX files of MNIST and Fashion-MNIST (plain or gzip), from a user directory."""
from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch

from ._errors import DataFormatError, MissingDataError
from ._images import ImageData

__all__ = ["read_idx", "load_mnist", "load_fashion_mnist", "FASHION_CLASSES"]

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    # Detect gzip by its magic bytes, not by the name: mirrors rename files freely.
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataFormatError(f"{path}: cannot decompress gzip data ({e})") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed) into a numpy array.

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each size as a big-endian
    uint32, then the values in row-major order, big-endian.

    Args:
        path: the file; gzip is detected from the content.

    Returns:
        Array of the file's shape, in native byte order.

    Raises:
        DataFormatError: bad magic, unknown type, or a size that does not match the data
            (the message names the file and both sizes).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(f"{path}: not an IDX file (header {raw[:4]!r}, expected two zero bytes first)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: unknown IDX type byte 0x{type_code:02x}; known: {sorted(map(hex, _IDX_DTYPES))}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataFormatError(f"{path}: header declares {ndim} dimensions but the file is only {len(raw)} bytes")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: sizes near 2**32 must not wrap around
    if len(raw) - header_len != expected:
        raise DataFormatError(
            f"{path}: header shape {shape} of {dtype.name} needs {expected} data bytes, "
            f"found {len(raw) - header_len}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _find(root: Path, stem: str, subdirs: tuple[str, ...]) -> Path | None:
    # Accept the official names, the dotted variant some mirrors use, and torchvision's folders.
    names = (stem, stem.replace("-idx", ".idx"))
    for d in ("", "raw", *subdirs):
        for name in names:
            for suffix in ("", ".gz"):
                p = root / d / (name + suffix)
                if p.is_file():
                    return p
    return None


def _load_idx_pair(root, split: str, dataset: str, subdirs: tuple[str, ...], classes: tuple[str, ...]) -> ImageData:
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"load_{dataset}: split must be 'train' or 'test', got {split!r}")
    if root is None:
        raise MissingDataError(f"load_{dataset}: pass root=<directory with the IDX files> (gradmeta never downloads)")
    root = Path(root).expanduser()
    prefix = _SPLIT_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find(root, s, subdirs) for s in stems]
    missing = [s for s, p in zip(stems, found) if p is None]
    if missing:
        raise MissingDataError(
            f"load_{dataset}: {', '.join(missing)} (or .gz) not found in {root} "
            f"(also looked in {', '.join(d + '/' for d in ('raw', *subdirs))}); gradmeta never downloads, "
            "put the IDX files there"
        )
    images_path, labels_path = found
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.dtype.kind not in "iu":
        raise DataFormatError(f"{labels_path}: labels must be integers (IDX type uint8/int8/int16/int32), "
                              f"got {labels.dtype}; is this a labels file?")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataFormatError(
            f"{labels_path}: expected {images.shape[0]} labels (one per image in {images_path.name}), got shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataFormatError(f"{labels_path}: label {bad} out of range for {len(classes)} classes "
                              f"(labels must lie in 0..{len(classes) - 1})")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageData(x, y, classes, f"{dataset}/{split}")


def load_mnist(root: str | os.PathLike | None, split: str = "train") -> ImageData:
    """MNIST from local IDX files: images ``(N, 1, 28, 28)`` in ``[0, 1]``, labels 0..9.

    Looks in ``root``, ``root/raw`` and ``root/MNIST/raw`` (torchvision's layout) for
    ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (``t10k-…`` for ``split="test"``),
    each plain or ``.gz``; the dotted names ``train-images.idx3-ubyte`` are accepted too.

    Raises:
        MissingDataError: files not found (the message lists where it looked).
        DataFormatError: a file is malformed or images and labels disagree in count.
    """
    return _load_idx_pair(root, split, "mnist", ("MNIST/raw",), tuple(str(c) for c in range(10)))


def load_fashion_mnist(root: str | os.PathLike | None, split: str = "train") -> ImageData:
    """Fashion-MNIST from local IDX files; same file names and layout as :func:`load_mnist`.

    Also looks in ``root/FashionMNIST/raw``. Class names are the ten Fashion-MNIST labels
    (``"T-shirt/top"`` … ``"Ankle boot"``).
    """
    return _load_idx_pair(root, split, "fashion_mnist", ("FashionMNIST/raw",), FASHION_CLASSES)
