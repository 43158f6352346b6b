"""A folder of LoRA adapters with labels: :class:`LoraDataset`."""
from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ._adapter import Adapter, AdapterFormatError, natural_key
from ._load import CONFIG_FILE, DIFFUSERS_COMPONENTS, load_adapter

__all__ = ["LoraDataset", "AdapterMismatchError", "find_adapter_folders", "check_compatible", "stack_factors"]


class AdapterMismatchError(ValueError):
    """Adapters of one dataset differ in their module names or layer shapes (the message lists how)."""


def find_adapter_folders(root: str | os.PathLike) -> list[Path]:
    """Every adapter folder under ``root`` (naturally sorted). A folder with ``adapter_config.json`` is
    one adapter (its named sub-adapters are not listed separately); a folder whose only adapter
    sub-folders are diffusers components (``unet/``, ``text_encoder/``, ...) is one adapter too."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LoraDataset: {root} is not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        subs = [s for s in dirnames if (d / s / CONFIG_FILE).exists()]
        diffusers = bool(subs) and all(s in DIFFUSERS_COMPONENTS for s in subs)
        if CONFIG_FILE in filenames or diffusers:
            found.append(d)
            dirnames[:] = []
        else:
            dirnames.sort(key=natural_key)
    return sorted(found, key=lambda p: natural_key(str(p.relative_to(root))))


def check_compatible(reference: Adapter, ad: Adapter) -> list[str]:
    """Differences between two adapters that stop them sharing one model (ranks may differ)."""
    problems = []
    missing = [k for k in reference.module_names if k not in ad.factors]
    extra = [k for k in ad.module_names if k not in reference.factors]
    if missing:
        problems.append(f"missing modules {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"extra modules {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k in reference.module_names:
        if k in ad.factors:
            a, b = reference[k], ad[k]
            if (a.weight_shape, a.kind) != (b.weight_shape, b.kind):
                problems.append(f"module {k!r} is {b.kind} {b.weight_shape}, expected {a.kind} {a.weight_shape}")
    return problems


def _read_labels_csv(path: Path) -> dict[str, dict[str, float | str]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise FileNotFoundError(f"LoraDataset: cannot read labels {path}: {e}") from e
    if not rows or "adapter" not in rows[0]:
        raise ValueError(f"LoraDataset: {path} needs a column 'adapter' (folder path relative to the root)")
    out = {}
    for row in rows:
        key = row.pop("adapter")
        out[key] = {k: _number(v) for k, v in row.items()}
    return out


def _number(v: str) -> float | str:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


class LoraDataset(torch.utils.data.Dataset):
    """Every LoRA adapter under ``root``, loaded and checked to share module names and shapes.

    ``ds[i]`` is ``(adapter, labels)`` with ``labels`` a dict (``{}`` without labels). Ranks may
    differ between adapters; module names, layer kinds and weight shapes may not.

    Args:
        root: folder searched recursively (see :func:`find_adapter_folders`).
        labels: ``None``; a CSV file with a column ``adapter`` (path relative to ``root``, ``/``
            separated) and one column per label (numbers parsed as floats); or a callable
            ``fn(path) -> dict``.
        skip_bad: skip unreadable, mismatched or unlabelled adapters instead of raising; they are
            listed in :attr:`skipped` as ``(path, reason)`` and in one warning.
        base_model, dtype: passed to :func:`load_adapter`.

    Raises:
        AdapterFormatError: an unreadable adapter (``skip_bad=False``); the message names the file.
        AdapterMismatchError: adapters that differ from the first one (all differences listed).
        KeyError: an adapter with no row in the labels CSV.
    """

    def __init__(self, root: str | os.PathLike, labels: str | os.PathLike | Callable | None = None, *,
                 skip_bad: bool = False, base_model=None, dtype: torch.dtype = torch.float32):
        self.root = Path(root)
        table = _read_labels_csv(Path(labels)) if isinstance(labels, (str, os.PathLike)) else None
        self.adapters: list[Adapter] = []
        self.labels: list[dict] = []
        self.paths: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        mismatches = []
        folders = find_adapter_folders(self.root)
        if not folders:
            raise FileNotFoundError(f"LoraDataset: no adapter folders ({CONFIG_FILE}) under {self.root}")
        for folder in folders:
            rel = folder.relative_to(self.root).as_posix()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # non-factor keys: reported per adapter in .other
                    ad = load_adapter(folder, base_model=base_model, dtype=dtype)
            except AdapterFormatError as e:
                if not skip_bad:
                    raise
                self.skipped.append((folder, str(e)))
                continue
            if self.adapters:
                problems = check_compatible(self.adapters[0], ad)
                if problems:
                    reason = f"differs from {self.paths[0]}: " + "; ".join(problems)
                    (self.skipped if skip_bad else mismatches).append((folder, reason))
                    continue
            if table is not None:
                if rel not in table:
                    if not skip_bad:
                        raise KeyError(f"LoraDataset: adapter {rel!r} has no row in {labels}")
                    self.skipped.append((folder, f"no row in {labels}"))
                    continue
                lab = table[rel]
            else:
                lab = dict(labels(folder)) if callable(labels) else {}
            self.adapters.append(ad)
            self.paths.append(folder)
            self.labels.append(lab)
        if mismatches:
            raise AdapterMismatchError(f"LoraDataset {self.root}: {len(mismatches)} adapters do not match "
                                       "the first one:\n  " + "\n  ".join(f"{p}: {r}" for p, r in mismatches))
        if self.skipped:
            warnings.warn(f"LoraDataset {self.root}: skipped {len(self.skipped)} adapters:\n  "
                          + "\n  ".join(f"{p}: {r}" for p, r in self.skipped), stacklevel=2)
        if not self.adapters:
            raise AdapterFormatError(f"LoraDataset: no readable adapter under {self.root}")

    def __len__(self) -> int:
        return len(self.adapters)

    def __getitem__(self, i: int) -> tuple[Adapter, dict]:
        return self.adapters[i], self.labels[i]

    @property
    def module_names(self) -> list[str]:
        """The module names shared by every adapter."""
        return self.adapters[0].module_names

    def label_tensor(self, columns: list[str] | str, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(N, len(columns))`` (or ``(N,)`` for one name) tensor of numeric labels."""
        cols = [columns] if isinstance(columns, str) else list(columns)
        try:
            t = torch.tensor([[float(lab[c]) for c in cols] for lab in self.labels], dtype=dtype)
        except KeyError as e:
            raise KeyError(f"LoraDataset: label column {e.args[0]!r} missing; have {sorted(self.labels[0])}") from None
        return t[:, 0] if isinstance(columns, str) else t


def stack_factors(adapters: list[Adapter], *, rank: int | None = None, dtype: torch.dtype | None = None
                  ) -> dict[str, tuple[Tensor, Tensor]]:
    """Batch adapters of any ranks: ``{module: (U (N, n, r), V (N, m, r))}`` with ``scale`` folded
    into ``U`` and zero columns padding every adapter to the largest rank (or ``rank``).

    Zero columns leave ``U Vᵀ`` unchanged, so GL-invariant models see the same adapter.
    """
    if not adapters:
        raise ValueError("stack_factors: no adapters")
    names = adapters[0].module_names
    out = {}
    for k in names:
        fs = [a[k] for a in adapters]
        r = rank if rank is not None else max(f.rank for f in fs)
        U = torch.zeros(len(fs), fs[0].shape[0], r, dtype=dtype or fs[0].U.dtype)
        V = torch.zeros(len(fs), fs[0].shape[1], r, dtype=dtype or fs[0].U.dtype)
        for i, f in enumerate(fs):
            if f.shape != fs[0].shape:
                raise AdapterMismatchError(f"stack_factors: module {k!r} is {f.shape} in adapter {i} "
                                           f"({adapters[i].path}), {fs[0].shape} in adapter 0")
            if f.rank > r:
                raise ValueError(f"stack_factors: module {k!r} of adapter {i} has rank {f.rank} > {r}")
            U[i, :, :f.rank] = f.scale * f.U
            V[i, :, :f.rank] = f.V
        out[k] = (U, V)
    return out
