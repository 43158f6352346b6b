"""Silent-wrong cases and bad files: per-module fan_in_fan_out, non-zero-B inits, config and tensor checks."""
from __future__ import annotations

import json
import pickle
import shutil
import warnings

import pytest
import torch
from torch import nn

from gradmeta import lora
from tests.lora.peft_refs import Mixed, make_peft, peft_deltas, save


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=8, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def gpt2_mixed(tmp_path_factory):
    """GPT-2 adapter on c_attn (Conv1D, weight (in, out)) and lm_head (Linear): PEFT saves one global flag."""
    pm = make_peft(tiny_gpt2(), r=2, lora_alpha=4, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True)
    return save(pm, tmp_path_factory.mktemp("gpt2") / "ad"), peft_deltas(pm)


def test_gpt2_mixed_resolved_from_base_model_or_config(gpt2_mixed):
    folder, want = gpt2_mixed
    for base in (tiny_gpt2(), tiny_gpt2().config):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ad = lora.load_adapter(folder, base_model=base)
        assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # resolved: no warning
        assert ad["transformer.h.0.attn.c_attn"].fan_in_fan_out and not ad["lm_head"].fan_in_fan_out
        for k, d in want.items():
            torch.testing.assert_close(ad[k].delta(), d, rtol=1e-6, atol=1e-7)


def test_gpt2_mixed_without_base_warns(gpt2_mixed):
    # PEFT rewrote its global flag to False when it met lm_head, so c_attn would come back transposed
    assert json.loads((gpt2_mixed[0] / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    with pytest.warns(UserWarning, match=r"fan_in_fan_out=False .* cannot be resolved for "
                                         r"\['transformer.h.0.attn.c_attn'\].*base_model"):
        lora.load_adapter(gpt2_mixed[0])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_nonzero_b_init_warns(tmp_path, init):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    pm = make_peft(base, r=2, target_modules=["0", "2"], init_lora_weights=init)
    folder = save(pm, tmp_path / init)
    with pytest.warns(UserWarning, match=f"init_lora_weights='{init}'.*not the difference"):
        ad = lora.load_adapter(folder)
    assert float(ad["0"].U.abs().sum()) > 0  # B is non-zero at initialisation
    for k, d in peft_deltas(pm).items():
        torch.testing.assert_close(ad[k].delta(), d, rtol=1e-5, atol=1e-6)


@pytest.fixture
def folder(tmp_path):
    pm = make_peft(Mixed(), r=4, lora_alpha=8, target_modules=["lin", "c1"])
    return save(pm, tmp_path / "ad")


def _edit(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    ({"lora_alpha": "8"}, "key 'lora_alpha' must be a positive number, got '8'"),
    ({"lora_alpha": None}, "key 'lora_alpha' must be a positive number, got None"),
    ({"lora_alpha": -2}, "key 'lora_alpha' must be a positive number, got -2"),
    ({"use_rslora": "false"}, "key 'use_rslora' must be true or false, got 'false'"),
    ({"alpha_pattern": ["lin"]}, "key 'alpha_pattern' must be an object"),
    ({"alpha_pattern": {"lin(": 3}}, r"key 'alpha_pattern': 'lin\(' is not a valid regular expression"),
    ({"r": 16}, "module 'c1' has rank 4 but the config says r = 16"),
    ({"rank_pattern": {"lin": 2}}, "module 'lin' has rank 4 but the config says r = 2"),
])
def test_bad_config_values_named(folder, changes, match):
    _edit(folder, **changes)
    with pytest.raises(lora.AdapterFormatError, match=match) as e:
        lora.load_adapter(folder)
    assert "adapter_config.json" in str(e.value) or "adapter_model.safetensors" in str(e.value)


def test_config_that_is_a_list(folder):
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(lora.AdapterFormatError, match=r"adapter_config.json: the adapter config must be a JSON object"):
        lora.load_adapter(folder)


def _edit_tensors(folder, fn):
    from safetensors.torch import load_file, save_file
    file = folder / "adapter_model.safetensors"
    state = load_file(file)
    fn(state)
    save_file(state, file)


@pytest.mark.parametrize("fn, match", [
    (lambda s: s.update({"base_model.model.lin.lora_A.weight": torch.ones(6)}), "at least 2 dimensions"),
    (lambda s: s.update({"base_model.model.lin.lora_A.weight": torch.ones(0, 6),
                         "base_model.model.lin.lora_B.weight": torch.ones(7, 0)}), "rank-0 factors"),
    (lambda s: s["base_model.model.c1.lora_B.weight"].__setitem__((0, 0), float("nan")),
     "module 'c1' holds non-finite values"),
])
def test_bad_tensors_named(folder, fn, match):
    _edit_tensors(folder, fn)
    with pytest.raises(lora.AdapterFormatError, match=match) as e:
        lora.load_adapter(folder)
    assert "adapter_model.safetensors" in str(e.value)


class _Payload:
    def __reduce__(self):
        return (print, ("payload executed",))


@pytest.mark.parametrize("content", [pickle.dumps({"x": _Payload()}), bytes(range(256)) * 4], ids=["payload", "random"])
def test_malicious_or_random_bin_refused(folder, content, capsys):
    shutil.copy(folder / "adapter_config.json", folder / "cfg.json")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(content)
    with pytest.raises(lora.AdapterFormatError, match=r"adapter_model.bin is not a state dict of tensors or contains "
                                                      r"code; refusing to load"):
        lora.load_adapter(folder)
    assert "payload executed" not in capsys.readouterr().out
