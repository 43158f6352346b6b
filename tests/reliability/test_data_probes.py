"""Probes: hostile or inconsistent data files end in one DataFormatError naming the file."""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

import gradmeta.data as gd
from tests.data.conftest import cifar_batch, write_idx, write_py3_pickle

from .conftest import CodePayload


def _images(n: int) -> np.ndarray:
    return np.zeros((n, 28, 28), dtype=np.uint8)


def test_idx_header_sizes_overflowing_int64(tmp_path):
    # 2**31 * 2**31 * 4 bytes wraps to 0 in int64: a file without data must not pass the size check
    path = tmp_path / "big-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2**31, 2**31, 4))
    with pytest.raises(gd.DataFormatError, match="big-idx3-ubyte.*needs 18446744073709551616 data bytes"):
        gd.read_idx(path)


def test_idx_header_disagreeing_with_file_length(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", _images(3))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(gd.DataFormatError, match="train-images-idx3-ubyte.*found"):
        gd.read_idx(path)


def test_idx_negative_labels(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", _images(3))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, -1, 2], dtype=np.int8))
    with pytest.raises(gd.DataFormatError, match="train-labels-idx1-ubyte: label -1 out of range"):
        gd.load_mnist(tmp_path)


def test_idx_float_labels(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", _images(3))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1.0, 2.5, 3.0], dtype=np.float32))
    with pytest.raises(gd.DataFormatError, match="train-labels-idx1-ubyte: labels must be integers"):
        gd.load_fashion_mnist(tmp_path)


def _cifar10_dir(tmp_path, rng):
    d = tmp_path / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_py3_pickle(d / name, cifar_batch(rng, 2, {"labels": 10}))
    return d


def test_cifar_truncated_pickle(tmp_path):
    d = _cifar10_dir(tmp_path, np.random.default_rng(0))
    data = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(data[: len(data) // 3])
    with pytest.raises(gd.DataFormatError, match="test_batch: not a readable CIFAR pickle"):
        gd.load_cifar10(tmp_path, "test")


def test_cifar_garbage_bytes(tmp_path):
    d = _cifar10_dir(tmp_path, np.random.default_rng(0))
    (d / "test_batch").write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(gd.DataFormatError, match="test_batch"):
        gd.load_cifar10(tmp_path, "test")


def test_cifar_code_payload_is_refused_not_run(tmp_path):
    d = _cifar10_dir(tmp_path, np.random.default_rng(0))
    marker = tmp_path / "pwned"
    (d / "test_batch").write_bytes(pickle.dumps({b"data": CodePayload(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(gd.DataFormatError, match=r"test_batch: refusing to unpickle (__builtin__|builtins)\.exec"):
        gd.load_cifar10(tmp_path, "test")
    assert not marker.exists()


def test_cifar_float_labels(tmp_path):
    d = _cifar10_dir(tmp_path, np.random.default_rng(0))
    batch = cifar_batch(np.random.default_rng(2), 2, {"labels": 10})
    batch[b"labels"] = [1.5, 2.0]
    write_py3_pickle(d / "test_batch", batch)
    with pytest.raises(gd.DataFormatError, match="test_batch: 'labels' must be integers"):
        gd.load_cifar10(tmp_path, "test")


def test_cifar_meta_names_not_a_list(tmp_path):
    d = _cifar10_dir(tmp_path, np.random.default_rng(0))
    write_py3_pickle(d / "batches.meta", {b"label_names": 7})
    with pytest.raises(gd.DataFormatError, match="batches.meta: 'label_names' must be a list"):
        gd.load_cifar10(tmp_path, "test")
