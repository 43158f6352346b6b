"""IDX reader and the MNIST / Fashion-MNIST loaders on generated files."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from gradmeta import data as gd


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, formats, dtype, gz):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    a = (rng.integers(info.min, info.max, (3, 4, 5), endpoint=True) if info else rng.normal(size=(3, 4, 5))).astype(dtype)
    got = gd.read_idx(formats.write_idx(tmp_path / "a-idx3-ubyte", a, gz=gz))
    assert got.dtype == dtype and got.shape == (3, 4, 5)
    np.testing.assert_array_equal(got, a)


def test_read_idx_rejects_malformed_files(tmp_path, formats):
    good = formats.write_idx(tmp_path / "good", np.arange(12, dtype=np.uint8).reshape(3, 4)).read_bytes()
    cases = {
        "magic": (b"\x01\x00" + good[2:], "not an IDX file"),
        "type": (good[:2] + b"\x07" + good[3:], "unknown IDX type byte 0x07"),
        "truncated": (good[:-1], r"header shape \(3, 4\) of uint8 needs 12 data bytes, found 11"),
        "extra": (good + b"\x00", "found 13"),
        "short_header": (good[:6], "declares 2 dimensions"),
    }
    for name, (raw, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(raw)
        with pytest.raises(gd.DataFormatError, match=msg) as e:
            gd.read_idx(p)
        assert name in str(e.value)  # the message names the file
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(gzip.compress(good)[:-8])
    with pytest.raises(gd.DataFormatError, match="bad.gz"):
        gd.read_idx(bad_gz)


def _write_mnist(formats, folder, split="train", n=6, gz=False, dotted=False, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    prefix = "train" if split == "train" else "t10k"
    sep = "." if dotted else "-"
    sfx = ".gz" if gz else ""
    formats.write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{sfx}", images, gz=gz)
    formats.write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{sfx}", labels, gz=gz)
    return images, labels


@pytest.mark.parametrize("layout", ["flat", "gz", "torchvision", "dotted"])
def test_load_mnist_layouts(tmp_path, formats, layout):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    images, labels = _write_mnist(formats, folder, gz=layout == "gz", dotted=layout == "dotted")
    d = gd.load_mnist(tmp_path, "train")
    assert d.images.shape == (6, 1, 28, 28) and d.images.dtype == torch.float32
    np.testing.assert_array_equal(d.images[:, 0].numpy(), images.astype(np.float32) / 255)
    np.testing.assert_array_equal(d.labels.numpy(), labels)
    assert d.name == "mnist/train" and d.num_classes == 10


def test_load_fashion_mnist_test_split(tmp_path, formats):
    _, labels = _write_mnist(formats, tmp_path / "FashionMNIST" / "raw", split="test", n=4, gz=True)
    d = gd.load_fashion_mnist(tmp_path, "test")
    assert len(d) == 4 and d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot"
    assert d.resize(8).flat().shape == (4, 64)  # the learned-optimizer task input
    np.testing.assert_array_equal(d.labels.numpy(), labels)


def test_mnist_missing_and_inconsistent_files(tmp_path, formats):
    with pytest.raises(gd.MissingDataError, match=r"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte.*never downloads"):
        gd.load_mnist(tmp_path, "test")
    with pytest.raises(gd.MissingDataError, match="root="):
        gd.load_mnist(None)
    with pytest.raises(ValueError, match="split"):
        gd.load_mnist(tmp_path, "val")
    rng = np.random.default_rng(0)
    formats.write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8))
    formats.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(gd.DataFormatError, match=r"train-labels-idx1-ubyte: expected 5 labels"):
        gd.load_mnist(tmp_path)
    formats.write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(5, 10, dtype=np.uint8))
    with pytest.raises(gd.DataFormatError, match="label 10 out of range"):
        gd.load_mnist(tmp_path)
    formats.write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28), dtype=np.float32))
    with pytest.raises(gd.DataFormatError, match="expected uint8 images"):
        gd.load_mnist(tmp_path)
