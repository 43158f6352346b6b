"""Adapter I/O against PEFT's own delta weights."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch import nn

from gradmeta import lora
from peft import LoraConfig

from tests.lora.peft_refs import GPT2Like, Mixed, MIXED_TARGETS, make_peft, peft_deltas, save


def assert_deltas_equal(ad, want):
    assert set(ad.module_names) == set(want)
    for name, d in want.items():
        got = ad[name].delta()
        assert got.shape == d.shape, name
        torch.testing.assert_close(got, d, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_mixed_targets_match_peft_delta(mixed_adapter):
    folder, want = mixed_adapter
    with pytest.warns(UserWarning, match="not LoRA factors"):
        ad = lora.load_adapter(folder)
    assert_deltas_equal(ad, want)
    assert ad["emb"].kind == "embedding" and ad["conv"].kind == "conv" and ad["lin"].kind == "linear"
    assert ad["lin"].rank == 2 and ad["blocks.3"].rank == 3 and ad["blocks.4"].rank == 4
    assert ad["conv"].scale == pytest.approx(3 / 2) and ad["lin"].scale == pytest.approx(8 / 2 ** 0.5)
    assert ad["emb"].U.shape == (11, 4) and ad["emb"].V.shape == (6, 4)
    assert ad["conv"].V.shape == (3 * 3 * 3, 4)
    # modules_to_save weights are reported, not mixed in
    assert set(ad.other) == {"head.weight", "head.bias"}


def test_natural_sort(mixed_adapter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = lora.load_adapter(mixed_adapter[0]).module_names
    blocks = [n for n in names if n.startswith("blocks.")]
    assert blocks == [f"blocks.{i}" for i in range(12)]
    assert lora.natural_key("layers.2") < lora.natural_key("layers.10")


def test_fan_in_fan_out_gpt2_conv1d(tmp_path):
    pm = make_peft(GPT2Like(), r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    ad = lora.load_adapter(save(pm, tmp_path / "gpt2"))
    assert ad["c_attn"].fan_in_fan_out and ad["c_attn"].delta().shape == (6, 9)
    assert_deltas_equal(ad, peft_deltas(pm))


def test_base_model_decides_fan_in_fan_out_per_module(tmp_path):
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = GPT2Like()
            self.lin = nn.Linear(4, 5)

    base = Both()
    pm = make_peft(base, r=2, target_modules=["c_attn", "lin"], fan_in_fan_out=True)
    ad = lora.load_adapter(save(pm, tmp_path / "both"), base_model=Both())
    assert_deltas_equal(ad, peft_deltas(pm))
    assert ad["g.c_attn"].fan_in_fan_out and not ad["lin"].fan_in_fan_out


def test_bin_named_adapter_and_dora_reported(tmp_path):
    torch.manual_seed(0)
    pm = make_peft(Mixed(), r=4, target_modules=["lin", "c1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("second", LoraConfig(r=3, lora_alpha=5, target_modules=["lin"],
                                            init_lora_weights=False, use_dora=True))
        pm.add_adapter("third", LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False, lora_bias=True))
    folder = save(pm, tmp_path / "bin", safe_serialization=False)
    assert (folder / "adapter_model.bin").exists() and (folder / "second" / "adapter_model.bin").exists()
    assert lora.list_adapters(folder) == ["default", "second", "third"]
    assert_deltas_equal(lora.load_adapter(folder), peft_deltas(pm))
    with pytest.warns(UserWarning, match="DoRA magnitudes"):
        second = lora.load_adapter(folder, "second")
    assert_deltas_equal(second, peft_deltas(pm, "second"))
    assert list(second.other) == ["lin.lora_magnitude_vector"]
    with pytest.warns(UserWarning, match="LoRA biases"):
        third = lora.load_adapter(folder, "third")
    assert_deltas_equal(third, peft_deltas(pm, "third"))
    assert list(third.other) == ["lin.lora_B.bias"]
    with pytest.raises(lora.AdapterFormatError, match="no adapter named 'fourth'"):
        lora.load_adapter(folder, "fourth")


def test_bin_is_loaded_with_weights_only(tmp_path, monkeypatch):
    pm = make_peft(Mixed(), r=2, target_modules=["lin"])
    folder = save(pm, tmp_path / "b", safe_serialization=False)
    seen = {}
    real = torch.load

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    lora.load_adapter(folder)
    assert seen.get("weights_only") is True


def test_diffusers_style_subfolders(tmp_path):
    root = tmp_path / "pipe"
    pm1 = make_peft(Mixed(), r=2, target_modules=["lin"])
    pm2 = make_peft(GPT2Like(), seed=1, r=3, target_modules=["c_proj"], fan_in_fan_out=True)
    save(pm1, root / "unet")
    save(pm2, root / "text_encoder")
    ad = lora.load_adapter(root)
    assert ad.module_names == ["text_encoder.c_proj", "unet.lin"]
    torch.testing.assert_close(ad["unet.lin"].delta(), peft_deltas(pm1)["lin"])
    torch.testing.assert_close(ad["text_encoder.c_proj"].delta(), peft_deltas(pm2)["c_proj"])
    assert lora.find_adapter_folders(tmp_path) == [root]


def test_corrupt_and_incomplete_files_are_named(tmp_path, mixed_adapter):
    folder = tmp_path / "bad"
    shutil.copytree(mixed_adapter[0], folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(lora.AdapterFormatError, match="adapter_model.safetensors"):
        lora.load_adapter(folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(lora.AdapterFormatError, match="adapter_config.json"):
        lora.load_adapter(folder)
    with pytest.raises(lora.AdapterFormatError, match="no adapter_config.json"):
        lora.load_adapter(tmp_path / "bad" / ".." / "..")


def test_unpaired_factor(tmp_path):
    from safetensors.torch import load_file, save_file
    pm = make_peft(Mixed(), r=2, target_modules=["lin", "c1"])
    folder = save(pm, tmp_path / "a")
    state = load_file(folder / "adapter_model.safetensors")
    del state["base_model.model.lin.lora_B.weight"]
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(lora.AdapterFormatError, match="'lin' has lora_A but no lora_B"):
        lora.load_adapter(folder)


def test_gl_transform_and_padding_keep_delta(mixed_adapter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = lora.load_adapter(mixed_adapter[0], dtype=torch.float64)
    Rs = {k: torch.randn(f.rank, f.rank, dtype=torch.float64) + 3 * torch.eye(f.rank, dtype=torch.float64)
          for k, f in ad.items()}
    for other in (ad.transform(Rs), ad.pad_rank(6)):
        for k in ad:
            torch.testing.assert_close(other[k].delta(), ad[k].delta(), rtol=1e-10, atol=1e-12)
    assert ad.pad_rank(6)["lin"].rank == 6
