"""Small file helpers shared by the library, the experiments and the runner (no gradmeta imports)."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "remove_stale_temps", "jsonable"]

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
