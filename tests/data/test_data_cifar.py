"""CIFAR-10/100 pickle readers on generated files (Python 2 style like the official ones, and Python 3)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from gradmeta import data as gd

C10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _write_cifar10(formats, folder, writer, n=3, meta=True):
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": formats.cifar_batch(rng, n, {"labels": 10}) for i in range(1, 6)}
    batches["test_batch"] = formats.cifar_batch(rng, n + 1, {"labels": 10})
    for name, d in batches.items():
        writer(folder / name, d)
    if meta:
        writer(folder / "batches.meta", {b"label_names": C10_NAMES, b"num_cases_per_batch": n, b"num_vis": 3072})
    return batches


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar10_train_concatenates_batches_in_order(tmp_path, formats, style):
    writer = formats.write_py2_pickle if style == "py2" else formats.write_py3_pickle
    batches = _write_cifar10(formats, tmp_path / "cifar-10-batches-py", writer)
    d = gd.load_cifar10(tmp_path, "train")
    data = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert d.images.shape == (15, 3, 32, 32) and d.name == "cifar10/train"
    # Each row holds the red, then green, then blue 32×32 plane, row-major.
    np.testing.assert_array_equal(d.images[4, 1, 2, 5].numpy(), np.float32(data[4, 1024 + 2 * 32 + 5]) / 255)
    np.testing.assert_array_equal((d.images.numpy() * 255).round().astype(np.uint8).reshape(15, -1), data)
    assert d.labels.tolist() == labels
    assert d.classes[0] == "airplane" and d.num_classes == 10
    test = gd.load_cifar10(tmp_path / "cifar-10-batches-py", "test")  # the folder itself works too
    assert len(test) == 4 and test.labels.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_str_keys_and_no_meta(tmp_path, formats):
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        b = formats.cifar_batch(rng, 2, {"labels": 10})
        formats.write_py3_pickle(tmp_path / name, {k.decode(): v for k, v in b.items()}, protocol=4)
    d = gd.load_cifar10(tmp_path, "test")
    assert d.classes == gd._cifar.CIFAR10_CLASSES and len(d) == 2


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar100_fine_and_coarse(tmp_path, formats, style):
    writer = formats.write_py2_pickle if style == "py2" else formats.write_py3_pickle
    folder = tmp_path / "cifar-100-python"
    rng = np.random.default_rng(0)
    train = formats.cifar_batch(rng, 5, {"fine_labels": 100, "coarse_labels": 20})
    writer(folder / "train", train)
    writer(folder / "test", formats.cifar_batch(rng, 2, {"fine_labels": 100, "coarse_labels": 20}))
    writer(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                             b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    fine = gd.load_cifar100(tmp_path, "train")
    coarse = gd.load_cifar100(tmp_path, "train", labels="coarse")
    assert fine.labels.tolist() == train[b"fine_labels"] and fine.num_classes == 100 and fine.classes[7] == "f7"
    assert coarse.labels.tolist() == train[b"coarse_labels"] and coarse.classes == tuple(f"c{i}" for i in range(20))
    assert fine.resize(8).flat().shape == (5, 3 * 64)
    assert len(gd.load_cifar100(tmp_path, "test")) == 2
    with pytest.raises(ValueError, match="fine"):
        gd.load_cifar100(tmp_path, labels="medium")


def test_cifar_refuses_code_in_pickles(tmp_path, formats):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _write_cifar10(formats, tmp_path, formats.write_py3_pickle, meta=False)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(gd.DataFormatError, match=r"test_batch: refusing to unpickle (posix|nt)\.system"):
        gd.load_cifar10(tmp_path, "test")
    assert not marker.exists()


def test_cifar_missing_and_malformed(tmp_path, formats):
    batches = _write_cifar10(formats, tmp_path / "cifar-10-batches-py", formats.write_py2_pickle)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(gd.MissingDataError, match=r"data_batch_3 not found in .*cifar-10-batches-py.*never downloads"):
        gd.load_cifar10(tmp_path)
    with pytest.raises(gd.MissingDataError, match=r"train not found"):
        gd.load_cifar100(tmp_path)
    bad = {**batches["test_batch"], b"data": np.zeros((4, 100), np.uint8)}
    formats.write_py2_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", bad)
    with pytest.raises(gd.DataFormatError, match=r"test_batch: 'data' must be uint8 \(N, 3072\), got uint8 \(4, 100\)"):
        gd.load_cifar10(tmp_path, "test")
    bad = {**batches["test_batch"], b"labels": [0, 1]}
    formats.write_py2_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", bad)
    with pytest.raises(gd.DataFormatError, match="must hold 4 labels"):
        gd.load_cifar10(tmp_path, "test")
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(gd.DataFormatError, match="not a readable CIFAR pickle"):
        gd.load_cifar10(tmp_path, "test")
