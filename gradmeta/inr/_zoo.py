"""INR zoos: many fitted SIRENs stored as safetensors shards plus a JSON index.

Layout of a zoo folder::

    index.json                  {"version", "config", "shards": [{"file", "sha256", "count", "ids",
                                  "splits", "labels", "psnr"}, ...]}
    shard-00000.safetensors     layers.*.{weight,bias} (n, ...), images (n, C, H, W), ids, labels, psnr
    shard-00000.json            the shard's index entry, written after the tensors (its commit marker)

Every file is written atomically (temporary file, then ``os.replace``). ``build_zoo`` skips
shards whose marker exists (resume), and under ``torchrun`` rank ``r`` of ``w`` fits shards
``k ≡ r (mod w)``; rank 0 writes ``index.json`` once all ranks are done.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .._io import atomic_write
from .._runtime import distributed_context
from ._fit import fit_inrs

__all__ = ["INRZoo", "ZooError", "build_zoo", "load_zoo", "write_shard", "zoo_images"]

INDEX = "index.json"


class ZooError(RuntimeError):
    """A zoo folder or shard is missing, truncated or corrupt (the message names the file)."""


@dataclass
class INRZoo:
    """A set of fitted INRs held in memory.

    Attributes:
        params: ``{name: (N, ...)}`` stacked SIREN parameters.
        images: ``(N, C, H, W)`` the images the INRs were fitted to.
        ids: ``(N,)`` image index inside its split's dataset.
        splits: ``N`` split names (``"train"`` / ``"test"``).
        labels: ``(N,)`` class labels.
        psnr: ``(N,)`` fit PSNR in dB.
        config: how the zoo was built (source, size, steps, lr, omega0, ...).
    """

    params: dict[str, Tensor]
    images: Tensor
    ids: Tensor
    splits: list[str]
    labels: Tensor
    psnr: Tensor
    config: dict

    def __len__(self) -> int:
        return self.ids.shape[0]

    def split(self, name: str) -> "INRZoo":
        """The INRs of one split."""
        idx = torch.tensor([i for i, s in enumerate(self.splits) if s == name], dtype=torch.long)
        return INRZoo({k: v[idx] for k, v in self.params.items()}, self.images[idx], self.ids[idx],
                      [name] * len(idx), self.labels[idx], self.psnr[idx], self.config)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_shard(folder: str | os.PathLike, k: int, params: dict[str, Tensor], images: Tensor, ids: Tensor,
                splits: list[str], labels: Tensor, psnr: Tensor) -> dict:
    """Atomically write shard ``k`` (tensors, then its JSON marker); return its index entry."""
    from safetensors.torch import save

    folder = Path(folder)
    name = f"shard-{k:05d}.safetensors"
    tensors = {**{n: v.contiguous() for n, v in params.items()}, "images": images.contiguous(),
               "ids": ids.long().contiguous(), "labels": labels.long().contiguous(), "psnr": psnr.contiguous()}
    data = save(tensors)
    atomic_write(folder / name, lambda f: f.write(data))
    entry = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "count": int(ids.shape[0]),
             "ids": ids.tolist(), "splits": list(splits), "labels": labels.tolist(),
             "psnr": [round(float(p), 3) for p in psnr]}
    atomic_write(folder / f"shard-{k:05d}.json", lambda f: f.write(json.dumps(entry)), mode="w")
    return entry


def _write_index(folder: Path, config: dict) -> dict:
    entries = []
    for marker in sorted(folder.glob("shard-*.json")):
        try:
            entries.append(json.loads(marker.read_text()))
        except json.JSONDecodeError as e:
            raise ZooError(f"{marker}: unreadable shard marker ({e}); delete it and rebuild with resume") from None
    index = {"version": 1, "config": config, "shards": entries}
    atomic_write(folder / INDEX, lambda f: f.write(json.dumps(index, indent=1)), mode="w")
    return index


def _read_shard(folder: Path, entry: dict, verify: bool) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = folder / entry["file"]
    if not path.exists():
        raise ZooError(f"{path}: shard listed in {folder / INDEX} is missing")
    if verify and _sha256(path) != entry["sha256"]:
        raise ZooError(f"{path}: checksum mismatch (truncated or corrupt shard); refit it with build_zoo(resume=True) "
                       f"after deleting {path.with_suffix('.json').name}, or load with skip_corrupt=True")
    try:
        t = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type on a bad header
        raise ZooError(f"{path}: cannot read shard ({type(e).__name__}: {e}); load with skip_corrupt=True "
                       "to use the other shards") from None
    if t.get("ids") is None or t["ids"].shape[0] != entry["count"]:
        raise ZooError(f"{path}: holds {None if 'ids' not in t else t['ids'].shape[0]} INRs, index says {entry['count']}")
    return t


def load_zoo(folder: str | os.PathLike, *, skip_corrupt: bool = False, verify: bool = True) -> INRZoo:
    """Load every shard listed in ``folder/index.json``.

    Args:
        folder: a zoo folder written by :func:`build_zoo`.
        skip_corrupt: warn about (and leave out) shards that are missing, truncated or corrupt
            instead of raising.
        verify: check each shard's SHA-256 against the index.

    Raises:
        ZooError: naming the index or the shard file at fault.
    """
    folder = Path(folder)
    try:
        index = json.loads((folder / INDEX).read_text())
    except FileNotFoundError:
        raise ZooError(f"{folder / INDEX} does not exist; is {folder} a zoo built with build_zoo?") from None
    except json.JSONDecodeError as e:
        raise ZooError(f"{folder / INDEX}: invalid JSON ({e})") from None
    parts, splits = [], []
    for entry in index["shards"]:
        try:
            t = _read_shard(folder, entry, verify)
        except ZooError as e:
            if not skip_corrupt:
                raise
            warnings.warn(f"skipping shard: {e}", stacklevel=2)
            continue
        parts.append(t)
        splits += entry["splits"]
    if not parts:
        raise ZooError(f"{folder}: no readable shards")
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    params = {k: v for k, v in cat.items() if k.startswith("layers.")}
    return INRZoo(params, cat["images"], cat["ids"], splits, cat["labels"], cat["psnr"], index["config"])


def zoo_images(source: str, split: str, *, root: str | None = None, size: int | None = None,
               limit: int | None = None) -> Tensor:
    """Images ``(N, C, H, W)`` in ``[0, 1]`` of a zoo source.

    ``source``: ``"digits"`` (embedded, 8×8, upsampled bilinearly to ``size``, default 16),
    ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"`` (local files under ``root``, optionally
    resized to ``size`` by area averaging). ``limit`` keeps the first ``limit`` images.
    """
    import torch.nn.functional as F

    from .. import data

    if source == "digits":
        x = data.load_digits(split).images
        s = size or 16
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False).clamp(0, 1)
    elif source in ("mnist", "fashion_mnist", "cifar10"):
        loader = {"mnist": data.load_mnist, "fashion_mnist": data.load_fashion_mnist,
                  "cifar10": data.load_cifar10}[source]
        d = loader(root, split)
        x = (d.resize(size) if size else d).images
    else:
        raise ValueError(f"unknown zoo source {source!r}; use 'digits', 'mnist', 'fashion_mnist' or 'cifar10'")
    return x[:limit] if limit is not None else x


def build_zoo(folder: str | os.PathLike, images: dict[str, Tensor], *, shard_size: int = 256, steps: int = 500,
              lr: float = 1e-3, seed: int = 0, resume: bool = True, progress: bool = False,
              labels: dict[str, Tensor] | None = None, config: dict | None = None,
              rank: int | None = None, world_size: int | None = None) -> dict:
    """Fit one SIREN per image and store the zoo in ``folder``.

    Args:
        folder: output folder (created).
        images: ``{split: (N, C, H, W)}``; each split is cut into shards of ``shard_size``.
        steps, lr: Adam fitting budget (see :func:`fit_inrs`).
        seed: the initialisation of shard ``k`` uses seed ``seed·100003 + k`` (independent of ranks).
        resume: skip shards whose marker file exists; ``False`` refits everything.
        progress: tqdm bar over shards (rank 0).
        labels: ``{split: (N,)}`` class labels (default -1).
        config: extra entries recorded in the index's ``config``.
        rank, world_size: default from ``torchrun`` (``gradmeta._runtime.distributed_context``).

    Returns:
        ``{"fitted", "skipped", "seconds", "inrs_per_s", "index"}`` for this rank (``index`` on rank 0).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if rank is None or world_size is None:
        rank, world_size = distributed_context()
    jobs = []
    k = 0
    for split, x in images.items():
        for start in range(0, x.shape[0], shard_size):
            jobs.append((k, split, start, min(start + shard_size, x.shape[0])))
            k += 1
    mine = [j for j in jobs if j[0] % world_size == rank]
    fitted = skipped = 0
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    for k, split, a, b in tqdm(mine, desc=f"zoo shards (rank {rank})", disable=not progress or rank != 0):
        marker = folder / f"shard-{k:05d}.json"
        if resume and marker.exists() and (folder / f"shard-{k:05d}.safetensors").exists():
            skipped += b - a
            continue
        x = images[split][a:b]
        g = torch.Generator().manual_seed(seed * 100003 + k)
        res = fit_inrs(x, steps=steps, lr=lr, generator=g)
        lab = labels[split][a:b] if labels is not None else torch.full((b - a,), -1)
        write_shard(folder, k, res.params, x, torch.arange(a, b), [split] * (b - a), lab, res.psnr)
        fitted += b - a
    seconds = time.perf_counter() - t0
    out = {"fitted": fitted, "skipped": skipped, "seconds": seconds,
           "inrs_per_s": fitted / seconds if fitted else None}
    import torch.distributed as dist
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()  # explicit rank/world_size without a process group: the caller orders the ranks
    if rank == 0:
        cfg = {"steps": steps, "lr": lr, "seed": seed, "shard_size": shard_size, **(config or {})}
        out["index"] = _write_index(folder, cfg)
    return out
