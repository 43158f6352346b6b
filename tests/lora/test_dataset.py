"""LoraDataset: discovery, labels, shape checks, corrupt files, batching."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from gradmeta import lora
from tests.lora.peft_refs import make_peft, save


def test_finds_labels_and_ranks(zoo_root):
    ds = lora.LoraDataset(zoo_root, zoo_root / "labels.csv")
    assert len(ds) == 6 and [p.name for p in ds.paths] == [f"ad{i}" for i in range(6)]
    assert ds.module_names == ["0", "2"]
    assert [a["0"].rank for a, _ in ds] == [2, 4, 8, 2, 4, 8]
    torch.testing.assert_close(ds.label_tensor("acc"), 0.1 * torch.arange(6.0))
    assert ds[1][1]["group"] == "g1"
    with pytest.raises(KeyError, match="'nope' missing"):
        ds.label_tensor(["nope"])


def test_callable_labels(zoo_root):
    ds = lora.LoraDataset(zoo_root, lambda p: {"idx": int(p.name[2:])})
    assert [lab["idx"] for _, lab in ds] == list(range(6))


def test_stack_factors_pads_and_folds_scale(zoo_root):
    ds = lora.LoraDataset(zoo_root)
    ads = [a for a, _ in ds]
    st = lora.stack_factors(ads)
    U, V = st["0"]
    assert U.shape == (6, 6, 8) and V.shape == (6, 5, 8)
    for i, a in enumerate(ads):
        torch.testing.assert_close(U[i] @ V[i].T, a["0"].delta(), rtol=1e-5, atol=1e-6)


def _copy(zoo_root, tmp_path):
    root = tmp_path / "z"
    shutil.copytree(zoo_root, root)
    return root


def test_mismatched_shapes_and_modules_listed(zoo_root, tmp_path):
    root = _copy(zoo_root, tmp_path)
    other = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    save(make_peft(other, r=2, target_modules=["0", "2"]), root / "wide")
    save(make_peft(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), r=2, target_modules=["0"]),
         root / "fewer")
    with pytest.raises(lora.AdapterMismatchError) as e:
        lora.LoraDataset(root)
    msg = str(e.value)
    assert "2 adapters do not match" in msg
    assert "wide: differs" in msg and "module '0' is linear (7, 5), expected linear (6, 5)" in msg
    assert "fewer: differs" in msg and "missing modules ['2']" in msg


def test_corrupt_file_error_and_skip(zoo_root, tmp_path):
    root = _copy(zoo_root, tmp_path)
    (root / "ad3" / "adapter_model.safetensors").write_bytes(b"broken")
    with pytest.raises(lora.AdapterFormatError, match=r"ad3/adapter_model\.safetensors"):
        lora.LoraDataset(root, root / "labels.csv")
    with pytest.warns(UserWarning, match="skipped 1 adapters"):
        ds = lora.LoraDataset(root, root / "labels.csv", skip_bad=True)
    assert len(ds) == 5 and [p.name for p, _ in ds.skipped] == ["ad3"]


def test_missing_label_row(zoo_root, tmp_path):
    root = _copy(zoo_root, tmp_path)
    lines = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(KeyError, match="'ad5' has no row"):
        lora.LoraDataset(root, root / "labels.csv")
