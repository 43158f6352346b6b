"""load_dataset by name, the data directory from the environment, and the public surface."""
from __future__ import annotations

import numpy as np
import pytest

from gradmeta import data as gd


def test_load_dataset_digits_and_unknown():
    d = gd.load_dataset("digits", "test", seed=0)
    assert d.name == "digits/test" and len(d) == 359
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        gd.load_dataset("imagenet")
    assert set(gd.DATASETS) == {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100"}


def test_load_dataset_root_from_environment(tmp_path, formats, monkeypatch):
    formats.write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    formats.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 1], np.uint8))
    monkeypatch.delenv("GRADMETA_DATA", raising=False)
    with pytest.raises(gd.MissingDataError, match="GRADMETA_DATA"):
        gd.load_dataset("fashion-mnist", "test")
    monkeypatch.setenv("GRADMETA_DATA", str(tmp_path))
    assert gd.load_dataset("fashion-mnist", "test").labels.tolist() == [3, 1]
    assert gd.load_dataset("mnist", "test", root=tmp_path).name == "mnist/test"


def test_public_names_documented():
    for name in gd.__all__:
        obj = getattr(gd, name)
        if callable(obj):
            assert obj.__doc__ and obj.__doc__.strip(), f"gradmeta.data.{name} has no docstring"
