"""Readers for the CIFAR-10 / CIFAR-100 "python version" pickles, from a user directory.

The files are Python pickles, and unpickling runs whatever code a file names. They are read
with an unpickler that resolves only the handful of numpy/codecs names that array pickles use,
so a tampered file fails with :class:`DataFormatError` instead of executing code.
"""
from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ._errors import DataFormatError, MissingDataError
from ._images import ImageData

__all__ = ["load_cifar", "load_cifar10", "load_cifar100", "read_cifar_pickle", "CIFAR10_CLASSES"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# What pickled numpy arrays reference: Python 2 (the official files) and Python 3, protocols 2-5,
# numpy 1 (numpy.core) and numpy 2 (numpy._core).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the official files are Python 2 pickles
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise DataFormatError(
                f"{self._path}: refusing to unpickle {module}.{name}; a CIFAR pickle holds only dicts, "
                "lists, bytes and numpy arrays"
            )
        if module.startswith("numpy.core."):  # numpy 2 renamed numpy.core to numpy._core
            try:
                return getattr(importlib.import_module("numpy._core." + module.split(".", 2)[2]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, object]:
    """Load one CIFAR pickle (a data batch or a meta file) with the restricted unpickler.

    Returns:
        The pickled dict with keys decoded to ``str`` (Python 2 files have ``bytes`` keys).

    Raises:
        DataFormatError: not a pickle, not a dict, or it names anything beyond numpy arrays.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, path).load()
    except DataFormatError:
        raise
    except Exception as e:  # a truncated or foreign file raises all kinds of unpickling errors
        raise DataFormatError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(meta: dict[str, object], key: str, path: Path) -> tuple[str, ...]:
    if key not in meta:
        raise DataFormatError(f"{path}: no {key!r} entry (found {sorted(meta)})")
    names = meta[key]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataFormatError(f"{path}: {key!r} must be a list of class names, got {type(names).__name__}")
    try:
        return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: {key!r} holds a name that is not UTF-8 ({e})") from None


def _batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = read_cifar_pickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise DataFormatError(f"{path}: no {key!r} entry (found {sorted(d)})")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataFormatError(f"{path}: {label_key!r} must hold {data.shape[0]} labels, got shape {labels.shape}")
    if labels.size and labels.dtype.kind not in "iu":
        raise DataFormatError(f"{path}: {label_key!r} must be integers, got {labels.dtype}")
    return data, labels.astype(np.int64)


def _find_dir(root, dataset: str, folder: str, files: list[str]) -> Path:
    if root is None:
        raise MissingDataError(f"load_{dataset}: pass root=<directory with {folder}/> (gradmeta never downloads)")
    root = Path(root).expanduser()
    for d in (root / folder, root):
        if all((d / f).is_file() for f in files):
            return d
    have = root / folder if (root / folder).is_dir() else root
    missing = [f for f in files if not (have / f).is_file()]
    raise MissingDataError(
        f"load_{dataset}: {', '.join(missing)} not found in {have} (looked in {root / folder} and {root}); "
        f"gradmeta never downloads, unpack the CIFAR python archive there"
    )


def _to_images(data: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], name: str, path: Path) -> ImageData:
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataFormatError(f"{path}: labels span {labels.min()}..{labels.max()} but there are {len(classes)} classes")
    # Rows are the red, green, blue 32×32 planes one after another (channel-first).
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return ImageData(x, torch.from_numpy(labels), classes, name)


def load_cifar10(root: str | os.PathLike | None, split: str = "train") -> ImageData:
    """CIFAR-10 from the python pickles: images ``(N, 3, 32, 32)`` in ``[0, 1]``, labels 0..9.

    ``root`` is the folder holding ``cifar-10-batches-py/`` (or that folder itself) with
    ``data_batch_1`` … ``data_batch_5`` (train, concatenated in that order) and ``test_batch``.
    Class names come from ``batches.meta`` when present.

    Raises:
        MissingDataError: files not found (the message lists which and where).
        DataFormatError: a file is malformed or refers to anything but numpy arrays.
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_cifar10: split must be 'train' or 'test', got {split!r}")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    d = _find_dir(root, "cifar10", "cifar-10-batches-py", files)
    classes = _names(read_cifar_pickle(d / "batches.meta"), "label_names", d / "batches.meta") \
        if (d / "batches.meta").is_file() else CIFAR10_CLASSES
    parts = [_batch(d / f, "labels") for f in files]
    data, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return _to_images(data, labels, classes, f"cifar10/{split}", d)


def load_cifar100(root: str | os.PathLike | None, split: str = "train", *, labels: str = "fine") -> ImageData:
    """CIFAR-100 from the python pickles: images ``(N, 3, 32, 32)`` in ``[0, 1]``.

    ``root`` is the folder holding ``cifar-100-python/`` (or that folder itself) with ``train``
    and ``test``. Class names come from ``meta`` when present (else ``"0"`` … ``"99"``).

    Args:
        root: the data directory.
        split: ``"train"`` or ``"test"``.
        labels: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_cifar100: split must be 'train' or 'test', got {split!r}")
    if labels not in ("fine", "coarse"):
        raise ValueError(f"load_cifar100: labels must be 'fine' or 'coarse', got {labels!r}")
    d = _find_dir(root, "cifar100", "cifar-100-python", [split])
    n_classes = 100 if labels == "fine" else 20
    classes = _names(read_cifar_pickle(d / "meta"), f"{labels}_label_names", d / "meta") \
        if (d / "meta").is_file() else tuple(str(c) for c in range(n_classes))
    if len(classes) != n_classes:
        raise DataFormatError(f"{d / 'meta'}: expected {n_classes} {labels} label names, got {len(classes)}")
    data, y = _batch(d / split, f"{labels}_labels")
    return _to_images(data, y, classes, f"cifar100/{split}", d / split)


def load_cifar(root: str | os.PathLike | None, split: str = "train", num_classes: int = 10, **kwargs) -> ImageData:
    """CIFAR-10 or CIFAR-100 by its number of classes: :func:`load_cifar10` or :func:`load_cifar100`.

    Args:
        root: the data directory (see the two loaders for the layouts accepted).
        split: ``"train"`` or ``"test"``.
        num_classes: ``10`` (CIFAR-10), ``100`` (CIFAR-100 fine labels) or ``20`` (CIFAR-100
            coarse labels).
        **kwargs: passed on to the loader.

    Returns:
        :class:`ImageData` with images ``(N, 3, 32, 32)`` float in ``[0, 1]``; the raw uint8 pixels
        are ``(images * 255).round().to(torch.uint8)`` exactly.
    """
    if num_classes == 10:
        return load_cifar10(root, split, **kwargs)
    if num_classes in (100, 20):
        return load_cifar100(root, split, labels="fine" if num_classes == 100 else "coarse", **kwargs)
    raise ValueError(f"load_cifar: num_classes must be 10, 100 or 20 (CIFAR-100 coarse), got {num_classes!r}")
