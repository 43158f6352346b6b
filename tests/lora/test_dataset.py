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
    with pytest.raises(lora.LabelError, match="no label column 'nope'"):
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
    assert "2 adapters differ from the module set most adapters share" in msg
    assert "wide: module '0' is linear (7, 5), expected linear (6, 5)" in msg
    assert "fewer: missing modules ['2']" in msg


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
    with pytest.raises(lora.LabelError, match="'ad5' has no row"):
        lora.LoraDataset(root, root / "labels.csv")


def _base():
    torch.manual_seed(100)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))


def test_majority_not_first_folder_and_explicit_modules(zoo_root, tmp_path):
    root = _copy(zoo_root, tmp_path)
    save(make_peft(_base(), r=2, target_modules=["0"]), root / "a_odd")  # sorts first
    with pytest.warns(UserWarning, match="skipped 1 adapters"):
        ds = lora.LoraDataset(root, skip_bad=True)
    assert len(ds) == 6 and ds.module_names == ["0", "2"] and [p.name for p, _ in ds.skipped] == ["a_odd"]
    ds = lora.LoraDataset(root, modules=["0"])  # every adapter adapts "0": all 7, restricted to it
    assert len(ds) == 7 and all(a.module_names == ["0"] for a in ds.adapters)
    with pytest.raises(lora.AdapterMismatchError, match="no adapter adapts all of the given modules"):
        lora.LoraDataset(root, modules=["nope"])


def test_named_sub_adapters_reported_or_included(zoo_root, tmp_path):
    from peft import LoraConfig
    root = _copy(zoo_root, tmp_path)
    pm = make_peft(_base(), r=2, target_modules=["0", "2"])
    pm.add_adapter("extra", LoraConfig(r=3, target_modules=["0", "2"], init_lora_weights=False))
    save(pm, root / "ad9")
    with pytest.warns(UserWarning, match=r"1 named sub-adapters are not included .*ad9/extra"):
        ds = lora.LoraDataset(root)
    assert len(ds) == 7
    ds = lora.LoraDataset(root, include_named=True)
    assert len(ds) == 8 and ds.paths[-1] == root / "ad9" / "extra" and ds[7][0]["0"].rank == 3


def test_non_finite_adapter_named_or_skipped(zoo_root, tmp_path):
    from safetensors.torch import load_file, save_file
    root = _copy(zoo_root, tmp_path)
    f = root / "ad2" / "adapter_model.safetensors"
    state = load_file(f)
    next(iter(state.values()))[0, 0] = float("nan")
    save_file(state, f)
    with pytest.raises(lora.AdapterFormatError, match=r"ad2/adapter_model.safetensors: module '\d' holds non-finite"):
        lora.LoraDataset(root)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(lora.LoraDataset(root, skip_bad=True)) == 5
    lazy = lora.LoraDataset(root, check_values=False)  # headers only: found when loaded
    assert len(lazy) == 6
    with pytest.raises(lora.AdapterFormatError, match="ad2/adapter_model.safetensors"):
        lazy[2]


def test_bad_label_cell_names_line_and_column(zoo_root, tmp_path):
    root = _copy(zoo_root, tmp_path)
    text = (root / "labels.csv").read_text().replace("ad3,0.30000000000000004,", "ad3,,").replace("ad3,0.3,", "ad3,,")
    (root / "labels.csv").write_text(text)
    ds = lora.LoraDataset(root, root / "labels.csv")
    with pytest.raises(lora.LabelError, match=r"labels.csv line 5 \(adapter 'ad3'\), column 'acc': '' is not a finite"):
        ds.label_tensor("acc")


def test_thousand_adapters_memory_bounded(tmp_path):
    """1,000 adapters (copies of a PEFT folder with distinct values): the cache never holds more than
    cache_size adapters, however many are visited, and values come back right."""
    import gc
    from safetensors.torch import load_file, save_file
    src = save(make_peft(_base(), r=2, target_modules=["0", "2"]), tmp_path / "src")
    state = load_file(src / "adapter_model.safetensors")
    root = tmp_path / "many"
    for i in range(1000):
        d = root / f"a{i}"
        d.mkdir(parents=True)
        shutil.copy(src / "adapter_config.json", d)
        save_file({k: v * (i + 1) for k, v in state.items()}, d / "adapter_model.safetensors")
    ds = lora.LoraDataset(root, cache_size=16)
    assert len(ds) == 1000

    def live_factors():
        gc.collect()
        return sum(isinstance(o, lora.LoraFactors) for o in gc.get_objects())

    before = live_factors()
    for i in range(len(ds)):
        a, _ = ds[i]
    assert len(ds._cache) == 16 and live_factors() - before <= 16 * 2
    torch.testing.assert_close(ds[999][0]["0"].U, state["base_model.model.0.lora_B.weight"] * 1000)
