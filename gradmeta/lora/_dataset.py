"""A folder of LoRA adapters with labels: :class:`LoraDataset` (lazy, bounded memory)."""
from __future__ import annotations

import csv
import math
import os
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ._adapter import Adapter, AdapterFormatError, natural_key
from ._load import CONFIG_FILE, DIFFUSERS_COMPONENTS, LORA_FILE_SUFFIXES, WEIGHT_FILES, load_adapter

__all__ = ["LoraDataset", "AdapterMismatchError", "LabelError", "find_adapter_folders", "check_compatible",
           "stack_factors"]


class AdapterMismatchError(ValueError):
    """Adapters of one dataset differ in their module names or layer shapes (the message lists how)."""


class LabelError(ValueError):
    """A labels file or cell that cannot be used; the message names the file, row and column."""


def _named_subs(d: Path) -> list[str]:
    return sorted((s.name for s in d.iterdir() if s.is_dir() and (s / CONFIG_FILE).exists()
                   and s.name not in DIFFUSERS_COMPONENTS), key=natural_key)


def find_adapter_folders(root: str | os.PathLike) -> list[Path]:
    """Every adapter under ``root`` (naturally sorted): a folder with ``adapter_config.json`` (its named
    sub-adapters are not listed separately), a folder whose only adapter sub-folders are diffusers
    components (``unet/``, ...), a folder holding ``pytorch_lora_weights.safetensors``, and every other
    single LoRA file (``*.safetensors``, ``*.bin``, ...: diffusers or kohya / A1111 files)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such adapter folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        subs = [s for s in dirnames if (d / s / CONFIG_FILE).exists()]
        diffusers = bool(subs) and all(s in DIFFUSERS_COMPONENTS for s in subs)
        if CONFIG_FILE in filenames or diffusers or "pytorch_lora_weights.safetensors" in filenames:
            found.append(d)
            dirnames[:] = []
            continue
        found += [d / f for f in filenames if Path(f).suffix in LORA_FILE_SUFFIXES and f not in WEIGHT_FILES]
        dirnames.sort(key=natural_key)
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


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


def _read_labels_csv(path: Path) -> dict[str, tuple[int, dict[str, str]]]:
    """``{adapter: (line number, {column: cell})}``."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LabelError(f"{path}: cannot read labels: {e}") from e
    if not rows or "adapter" not in rows[0][1]:
        raise LabelError(f"{path}: needs a header with a column 'adapter' (adapter path relative to the root) "
                         "and at least one row")
    out = {}
    for line, row in rows:
        key = (row.pop("adapter") or "").strip().strip("/")
        if key in out:
            raise LabelError(f"{path} line {line}: adapter {key!r} already has a row (line {out[key][0]})")
        out[key] = (line, row)
    return out


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


class _LazyAdapters(Sequence):
    """``ds.adapters``: a read-only sequence that loads adapters on access (through the dataset's cache)."""

    def __init__(self, ds: "LoraDataset"):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.ds.adapter(j) for j in range(len(self))[i]]
        return self.ds.adapter(i)


class LoraDataset(torch.utils.data.Dataset):
    """Every LoRA adapter under ``root``, checked to share module names and shapes, loaded lazily.

    ``ds[i]`` is ``(adapter, labels)`` with ``labels`` a dict (``{}`` without labels). Ranks may
    differ between adapters; module names, layer kinds and weight shapes may not. Construction scans
    every adapter once, one at a time (safetensors files are memory-mapped; with
    ``check_values=False`` only their headers are read); afterwards adapters are read on access and
    at most ``cache_size`` decoded adapters are kept (least recently used first out), so memory
    stays bounded for datasets larger than memory.

    Args:
        root: folder searched recursively (see :func:`find_adapter_folders`).
        labels: ``None``; a CSV file with a column ``adapter`` (path relative to ``root``, ``/``
            separated; ``folder/name`` for a named sub-adapter) and one column per label; or a
            callable ``fn(path) -> dict``.
        modules: the expected module names. Every adapter must adapt them (other modules are left
            out); without it, the module set and shapes most adapters share are expected (ties: the
            larger set) — never simply the first adapter's.
        skip_bad: skip unreadable, non-finite, mismatched or unlabelled adapters instead of raising;
            they are listed in :attr:`skipped` as ``(path, reason)`` and in one warning.
        include_named: also include the named sub-adapters of PEFT folders (as ``folder/name``);
            otherwise they are listed in :attr:`named` and reported in a warning.
        check_values: read every value at construction to refuse non-finite adapters up front
            (otherwise a non-finite adapter raises when it is loaded, naming its file).
        cache_size: decoded adapters kept in memory.
        base_model, dtype: passed to :func:`load_adapter`.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no adapter.
        AdapterFormatError: an unreadable or non-finite adapter (``skip_bad=False``); names the file.
        AdapterMismatchError: adapters that differ from the expected set (all differences listed).
        LabelError: a labels file without an ``adapter`` column, or an adapter without a row.
    """

    def __init__(self, root: str | os.PathLike, labels: str | os.PathLike | Callable | None = None, *,
                 modules: Iterable[str] | None = None, skip_bad: bool = False, include_named: bool = False,
                 check_values: bool = True, cache_size: int = 64, base_model=None,
                 dtype: torch.dtype = torch.float32):
        self.root = Path(root)
        self.base_model, self.dtype, self.cache_size = base_model, dtype, max(1, int(cache_size))
        self.labels_file = Path(labels) if isinstance(labels, (str, os.PathLike)) else None
        table = _read_labels_csv(self.labels_file) if self.labels_file is not None else None
        self.skipped: list[tuple[Path, str]] = []
        self.named: list[tuple[Path, str]] = []
        entries: list[tuple[Path, str | None]] = []
        for p in find_adapter_folders(self.root):
            entries.append((p, None))
            if p.is_dir() and (p / CONFIG_FILE).exists():
                for name in _named_subs(p):
                    (entries.append((p, name)) if include_named else self.named.append((p, name)))
        if not entries:
            raise FileNotFoundError(f"{self.root}: no LoRA adapters ({CONFIG_FILE} folders or LoRA weight files)")
        scanned = []  # (path, name, signature, rank)
        for p, name in entries:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # per-adapter notes: see load_adapter / `gradmeta lora info`
                    ad = load_adapter(p, name, base_model=base_model, shapes_only=not check_values)
            except AdapterFormatError as e:
                if not skip_bad:
                    raise
                self.skipped.append((p if name is None else p / name, str(e)))
                continue
            sig = {k: (f.kind, f.weight_shape) for k, f in ad.items()}
            scanned.append((p, name, sig, max(ad.ranks.values())))
            del ad
        if not scanned:
            raise AdapterFormatError(f"{self.root}: no readable adapter (skipped {len(self.skipped)})")
        self.module_names, reference = self._expected(scanned, modules)
        self.paths: list[Path] = []
        self.adapter_names: list[str | None] = []
        self.labels: list[dict] = []
        self.label_lines: list[int | None] = []
        self.max_ranks: list[int] = []
        mismatches = []
        for p, name, sig, rank in scanned:
            where = p if name is None else p / name
            problems = _differences(reference, sig, exact=modules is None)
            if problems:
                (self.skipped if skip_bad else mismatches).append((where, "; ".join(problems)))
                continue
            line = None
            if table is not None:
                rel = where.relative_to(self.root).as_posix()
                if rel not in table:
                    if not skip_bad:
                        raise LabelError(f"{self.labels_file}: adapter {rel!r} has no row")
                    self.skipped.append((where, f"no row in {self.labels_file}"))
                    continue
                line, lab = table[rel]
                lab = dict(lab)
            else:
                lab = dict(labels(where)) if callable(labels) else {}
            self.paths.append(where)
            self.adapter_names.append(name)
            self.labels.append(lab)
            self.label_lines.append(line)
            self.max_ranks.append(rank)
        if mismatches:
            raise AdapterMismatchError(f"{self.root}: {len(mismatches)} adapters differ from the module set most "
                                       f"adapters share ({len(reference)} modules):\n  "
                                       + "\n  ".join(f"{p}: {r}" for p, r in mismatches))
        if self.named:
            warnings.warn(f"{self.root}: {len(self.named)} named sub-adapters are not included (pass "
                          "include_named=True): " + ", ".join(f"{p}/{n}" for p, n in self.named[:5])
                          + (" ..." if len(self.named) > 5 else ""), stacklevel=2)
        if self.skipped:
            warnings.warn(f"{self.root}: skipped {len(self.skipped)} adapters:\n  "
                          + "\n  ".join(f"{p}: {r}" for p, r in self.skipped), stacklevel=2)
        if not self.paths:
            raise AdapterFormatError(f"{self.root}: no usable adapter (skipped {len(self.skipped)})")
        self._cache: OrderedDict[int, Adapter] = OrderedDict()

    @staticmethod
    def _expected(scanned, modules):
        if modules is not None:
            names = list(modules)
            if not names:
                raise ValueError("LoraDataset: modules is empty")
            having = [s for _, _, s, _ in scanned if all(k in s for k in names)]
            if not having:
                raise AdapterMismatchError(f"no adapter adapts all of the given modules {names[:5]}")
            votes = Counter(tuple((k, s[k]) for k in names) for s in having)
        else:
            votes = Counter(tuple(sorted(s.items(), key=lambda kv: natural_key(kv[0]))) for _, _, s, _ in scanned)
        best = max(votes.items(), key=lambda kv: (kv[1], len(kv[0])))[0]
        reference = dict(best)
        return sorted(reference, key=natural_key), reference

    def __len__(self) -> int:
        return len(self.paths)

    def adapter(self, i: int) -> Adapter:
        """Adapter ``i``, read on first access and kept in a small LRU cache (``cache_size``)."""
        i = range(len(self))[i]
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        p = self.paths[i] if self.adapter_names[i] is None else self.paths[i].parent
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad = load_adapter(p, self.adapter_names[i], base_model=self.base_model, dtype=self.dtype)
        if len(ad) != len(self.module_names):
            ad = Adapter({k: ad[k] for k in self.module_names}, ad.config, ad.path, ad.other)
        self._cache[i] = ad
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return ad

    @property
    def adapters(self) -> Sequence[Adapter]:
        """The adapters as a lazy sequence (``ds.adapters[i]`` loads through the cache)."""
        return _LazyAdapters(self)

    def __getitem__(self, i: int) -> tuple[Adapter, dict]:
        return self.adapter(i), {k: _number(v) for k, v in self.labels[i].items()}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{module: (n, m)}`` of every adapter (for ``Model.__init__``)."""
        return self.adapter(0).shapes

    def label_tensor(self, columns: list[str] | str, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(N, len(columns))`` (or ``(N,)`` for one name) tensor of numeric labels.

        Raises:
            LabelError: a missing column, or a cell that is blank, not a number or not finite (the
                message names the file, line, adapter and column).
        """
        cols = [columns] if isinstance(columns, str) else list(columns)
        src = self.labels_file or "labels"
        have = sorted(self.labels[0]) if self.labels else []
        for c in cols:
            if any(c not in lab for lab in self.labels):
                raise LabelError(f"{src}: no label column {c!r}; columns: {have}")
        out = torch.empty(len(self), len(cols), dtype=torch.float64)
        for i, lab in enumerate(self.labels):
            for j, c in enumerate(cols):
                v = _number(lab[c])
                if not isinstance(v, (int, float)) or not math.isfinite(v):
                    where = f"line {self.label_lines[i]}" if self.label_lines[i] else f"adapter {i}"
                    raise LabelError(f"{src} {where} (adapter {self.paths[i].relative_to(self.root).as_posix()!r}), "
                                     f"column {c!r}: {lab[c]!r} is not a finite number")
                out[i, j] = v
        out = out.to(dtype)
        return out[:, 0] if isinstance(columns, str) else out


def _differences(reference: dict, sig: dict, exact: bool) -> list[str]:
    problems = []
    missing = [k for k in reference if k not in sig]
    extra = [k for k in sig if k not in reference] if exact else []
    if missing:
        problems.append(f"missing modules {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"extra modules {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k, (kind, shape) in reference.items():
        if k in sig and sig[k] != (kind, shape):
            problems.append(f"module {k!r} is {sig[k][0]} {sig[k][1]}, expected {kind} {shape}")
    return problems


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
