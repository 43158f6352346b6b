"""Task lora_char_lm_zoo end to end on a tiny config: real PEFT folders, labels equal to re-evaluating
the merged model with our own deltas, membership, resume, sharding; lora_predict and its speed step on it."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from gradmeta import lora
from gradmeta.experiments.lora.char_lm_zoo import LM_BASE, evaluate_sources, lm_hyperparameters, load_lm_base
from gradmeta.run import run_spec
from gradmeta.specs import SpecError

TINY = """task = "lora_char_lm_zoo"
n_adapters = 6
sources = ["email", "logging", "numbers"]
[base]
d_model = 16
n_heads = 2
n_blocks = 1
seq_len = 16
steps = 3
batch_size = 4
[finetune]
steps_min = 2
steps_max = 3
batch_size = 2
max_sources = 2
lr_min = 0.05
lr_max = 0.1
[eval]
windows = 3
"""


@pytest.fixture(scope="module")
def lm_zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("char_lm_zoo")
    (d / "zoo.toml").write_text(TINY)
    return d, run_spec(d / "zoo.toml", d / "run", progress=False)


def test_labels_equal_reevaluation_with_our_deltas(lm_zoo):
    _, out = lm_zoo
    s = json.loads((out / "metrics.json").read_text())["summary"]
    assert s["adapters_done"] == 6 and s["eval_windows"] == 9
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert [r["adapter"] for r in rows] == [f"{i:05d}" for i in range(6)]
    spec = {"seed": 0, "sources": ["email", "logging", "numbers"],
            "finetune": {"ranks": [2, 4, 8], "alpha_mult": [1.0, 2.0], "lr_min": 0.05, "lr_max": 0.1, "steps_min": 2,
                         "steps_max": 3, "min_sources": 1, "max_sources": 2}}
    base0, ckpt = load_lm_base(out / LM_BASE)
    moved = 0
    for i, row in enumerate(rows):
        hp = lm_hyperparameters(spec, i)
        assert [row[f"src_{s}"] for s in spec["sources"]] == [str(int(s in hp["sources"])) for s in spec["sources"]]
        ad = lora.load_adapter(out / "adapters" / row["adapter"])
        assert set(ad.module_names) == {"blocks.0.attn.q", "blocks.0.attn.v"} and int(row["rank"]) == hp["rank"]
        model, _ = load_lm_base(out / LM_BASE)
        with torch.no_grad():
            for name, f in ad.items():  # merge W + ΔW with our own delta()
                model.get_submodule(name).weight += f.delta()
        ev = evaluate_sources(model, ckpt)
        for k, v in ev.items():
            assert float(row[k]) == pytest.approx(v, rel=1e-4, abs=1e-5)
        moved += abs(ev["eval_loss"] - evaluate_sources(base0, ckpt)["eval_loss"]) > 1e-4
    assert moved >= 3  # the finetunes change the model


def test_resume_rebuilds_identically_and_sharding(lm_zoo, tmp_path, monkeypatch):
    d, out = lm_zoo
    before = lora.load_adapter(out / "adapters" / "00002")
    (out / "adapters" / "00002" / "labels.json").unlink()
    run_spec(d / "zoo.toml", out, resume=True, progress=False)
    s = json.loads((out / "metrics.json").read_text())["summary"]
    assert s["built_this_process"] == 1 and s["adapters_done"] == 6
    after = lora.load_adapter(out / "adapters" / "00002")
    for k in before:
        torch.testing.assert_close(after[k].delta(), before[k].delta())
    (tmp_path / "z.toml").write_text(TINY.replace("n_adapters = 6", "n_adapters = 4"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    shard = run_spec(tmp_path / "z.toml", tmp_path / "shard", progress=False)
    assert sorted(p.name for p in (shard / "adapters").iterdir()) == ["00001", "00003"]


def test_bad_sources_are_spec_errors(tmp_path):
    (tmp_path / "z.toml").write_text(TINY.replace('"numbers"]', '"nope"]'))
    with pytest.raises(SpecError, match="unknown sources"):
        run_spec(tmp_path / "z.toml", tmp_path / "r", progress=False)
    (tmp_path / "y.toml").write_text(TINY.replace("max_sources = 2", "max_sources = 2\nmin_sources = 3"))
    with pytest.raises(SpecError, match="min_sources"):
        run_spec(tmp_path / "y.toml", tmp_path / "r2", progress=False)


def test_predict_tasks_and_speed_on_the_lm_zoo(lm_zoo, tmp_path):
    _, zoo = lm_zoo
    head = f'task = "lora_predict"\nzoo = "{zoo}"\nseeds = [0]\nmodels = ["GLNet", "SVDMLP"]\nmax_rank = 8\n'
    (tmp_path / "loss.toml").write_text(head + 'target = "eval_loss"\ntest_fraction = 0.5\n[train]\nepochs = 2\n'
                                               'batch_size = 2\n[speed]\nn_adapters = 2\n')
    s = json.loads((run_spec(tmp_path / "loss.toml", tmp_path / "a", progress=False) / "metrics.json").read_text())
    s = s["summary"]
    assert "GLNet/r2_mean" in s and sum(s[f"GLNet/variant_{v}_mean"] for v in lora.GLNet.VARIANTS) == 1.0
    assert s["speed/n_adapters"] == 2 and s["speed/evaluate_disk_s"] > 0 and s["speed/speedup_batch"] > 0
    (tmp_path / "m.toml").write_text(head + 'target = "membership"\nmembership_prefix = "src_"\n[train]\nepochs = 2\n'
                                            '[speed]\nenabled = false\n')
    s = json.loads((run_spec(tmp_path / "m.toml", tmp_path / "b", progress=False) / "metrics.json").read_text())
    assert 0 <= s["summary"]["GLNet/label_acc_mean"] <= 1
    (tmp_path / "x.toml").write_text(head + 'target = "membership"\nmembership_prefix = "zzz_"\n')
    with pytest.raises(SpecError, match="no column of .* starts with 'zzz_'"):
        run_spec(tmp_path / "x.toml", tmp_path / "c", progress=False)
