"""``load_dataset``: one entry point by name, for task specs and the command line."""
from __future__ import annotations

import os
from pathlib import Path

from ._cifar import load_cifar10, load_cifar100
from ._errors import MissingDataError
from ._idx import load_fashion_mnist, load_mnist
from ._images import ImageData, load_digits

__all__ = ["load_dataset", "DATASETS", "DATA_ENV_VAR"]

DATA_ENV_VAR = "GRADMETA_DATA"
_FILE_LOADERS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10, "cifar100": load_cifar100}
DATASETS = ("digits", *_FILE_LOADERS)


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, **kwargs) -> ImageData:
    """Load an image dataset by name: ``"digits"`` (embedded) or one read from local files.

    Args:
        name: one of :data:`DATASETS` (``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``).
        split: ``"train"`` or ``"test"`` (digits also ``"all"``).
        root: directory with the files of the file-based sets; default: the environment
            variable ``GRADMETA_DATA``. Ignored for ``digits``.
        **kwargs: passed on to the loader (e.g. ``labels="coarse"`` for CIFAR-100,
            ``test_fraction``/``seed`` for digits).

    Returns:
        :class:`ImageData` with images ``(N, C, H, W)`` in ``[0, 1]`` and int64 labels ``(N,)``.

    Raises:
        MissingDataError: no root given and ``GRADMETA_DATA`` unset, or the files are absent.
    """
    key = name.lower().replace("-", "_")
    if key == "digits":
        return load_digits(split, **kwargs)
    if key not in _FILE_LOADERS:
        raise ValueError(f"load_dataset: unknown dataset {name!r}; choose from {DATASETS}")
    if root is None:
        root = os.environ.get(DATA_ENV_VAR)
        if not root:
            raise MissingDataError(
                f"load_dataset({name!r}): no data directory; pass root=... or set {DATA_ENV_VAR} "
                "(gradmeta never downloads: put the files there yourself)"
            )
    return _FILE_LOADERS[key](Path(root), split, **kwargs)
