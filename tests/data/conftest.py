"""Writers of tiny files in the real dataset formats, written independently of the readers.

IDX: the layout from the MNIST page, packed with ``struct`` by hand. CIFAR: the official files
are Python 2 pickles (protocol 2, ``str`` = bytes, ``numpy.core`` names); ``write_py2_pickle``
reproduces that opcode stream, ``write_py3_pickle`` is what a user re-pickling under Python 3 gets.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    code = _IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes(order="C")
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)
    return path


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes every string as a Python 2 ``str`` (BINSTRING opcodes)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def write_py2_pickle(path: Path, obj) -> Path:
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names its module numpy._core; the Python 2 files say numpy.core.
    raw = buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def write_py3_pickle(path: Path, obj, protocol: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def cifar_batch(rng: np.random.Generator, n: int, label_keys: dict[str, int]) -> dict:
    """A batch dict like the official ones: bytes keys, uint8 data (n, 3072), label lists."""
    d = {b"batch_label": b"testing batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    for key, n_classes in label_keys.items():
        d[key.encode()] = [int(v) for v in rng.integers(0, n_classes, n)]
    return d


@pytest.fixture
def formats():
    return SimpleNamespace(write_idx=write_idx, write_py2_pickle=write_py2_pickle,
                           write_py3_pickle=write_py3_pickle, cifar_batch=cifar_batch)
