"""Small file helpers shared by the library, the experiments and the runner (no gradmeta imports)."""
from __future__ import annotations

import glob
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

__all__ = ["CheckpointError", "safe_torch_load", "atomic_write", "remove_stale_temps", "jsonable"]


class CheckpointError(ValueError):
    """A file that should hold tensors saved with ``torch.save`` cannot be loaded safely.

    The message names the file and what it was read as (checkpoint, data file, ...).
    """


def _load_failure(e: BaseException) -> str:
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it references {found.group(1)}"
    if "central directory" in text or isinstance(e, (EOFError, OSError)):
        return "the file is truncated or corrupted"
    if "Unsupported operand" in text or "invalid load key" in text:
        return "not a file written by torch.save"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first[:120]}" if first else type(e).__name__


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file.

    Args:
        path: the file.
        what: what the file should be, for messages (``"checkpoint"``, ``"data file"``, ...).
        map_location: passed to ``torch.load``.

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a folder).
        CheckpointError: anything else -- a file that references code (a pickled class or
            function), a truncated or corrupted file, or one not written by ``torch.save``:
            ``"FILE is not a gradmeta WHAT or contains code; refusing to load (REASON)"``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except (KeyboardInterrupt, MemoryError, PermissionError):
        raise
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ValueError, ...
        raise CheckpointError(f"{path} is not a gradmeta {what} or contains code; refusing to load "
                              f"({_load_failure(e)})") from e

_TMP = ".{name}.tmp-{pid}"


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write ``path`` via ``write(file)`` into a temporary file in the same folder, then ``os.replace``.

    A process killed mid-write leaves ``path`` as it was (the old file or none) plus at most one
    temporary ``.NAME.tmp-PID``; :func:`remove_stale_temps` removes those.
    """
    path = Path(path)
    tmp = path.with_name(_TMP.format(name=path.name, pid=os.getpid()))
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that :func:`atomic_write` left in ``folder`` when its process died.

    Only files named ``.NAME.tmp-PID`` whose process no longer runs are removed; returns them.
    """
    removed = []
    for p in glob.glob(os.path.join(glob.escape(str(folder)), ".*.tmp-*")):
        pid = p.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            Path(p).unlink(missing_ok=True)
            removed.append(Path(p))
    return removed


def jsonable(x: Any) -> Any:
    """``x`` with tensors as lists, tuples as lists, keys as strings and NaN/inf as ``None``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and callable(x.tolist):  # torch / numpy arrays and scalars
        return jsonable(x.tolist())
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x
