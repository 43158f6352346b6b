"""Task lora_zoo: real PEFT folders, labels that match re-evaluation with our deltas, resume, sharding."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from gradmeta import lora
from gradmeta.data import load_digits
from gradmeta.experiments.lora.zoo import evaluate, load_base
from gradmeta.run import run_spec
from gradmeta.specs import SpecError
from tests.lora.peft_refs import ZOO_SPEC as SPEC

def test_zoo_labels_match_merged_adapters(zoo_run):
    _, out = zoo_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["summary"]["adapters_done"] == 12
    ds = lora.LoraDataset(out / "adapters", out / "labels.csv")
    assert len(ds) == 12 and ds.module_names == ["0", "2", "4"]
    assert {a["0"].rank for a, _ in ds} <= {2, 4}
    te = load_digits("test", seed=0)
    for ad, lab in ds:
        model = load_base(out / "base.pt")
        with torch.no_grad():
            for name, f in ad.items():  # merge W + ΔW with our own delta()
                model.get_submodule(name).weight += f.delta()
        ev = evaluate(model, te.flat(), te.labels)
        assert ev["acc"] == pytest.approx(lab["test_acc"], abs=1e-6)
        assert ev["loss"] == pytest.approx(lab["test_loss"], rel=1e-4)
        assert 1 <= sum(lab[f"class_{c}"] for c in range(10)) == lab["n_classes"]


def test_zoo_resume_skips_and_rebuilds_identically(zoo_run):
    d, out = zoo_run
    before = lora.load_adapter(out / "adapters" / "00003")
    (out / "adapters" / "00003" / "labels.json").unlink()
    out2 = run_spec(d / "zoo.toml", out, resume=True, progress=False)
    m = json.loads((out2 / "metrics.json").read_text())
    assert m["summary"]["built_this_process"] == 1 and m["summary"]["adapters_done"] == 12
    after = lora.load_adapter(out / "adapters" / "00003")
    for k in before:
        torch.testing.assert_close(after[k].delta(), before[k].delta())


def test_zoo_sharding_by_rank(tmp_path, monkeypatch):
    (tmp_path / "zoo.toml").write_text(SPEC.replace("n_adapters = 12", "n_adapters = 5"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = run_spec(tmp_path / "zoo.toml", tmp_path / "run", progress=False)
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["00001", "00003"]
    assert not (out / "metrics.json").exists()   # under torchrun only rank 0 writes the run's metrics


def test_llama_zoo_labels_and_custom_target(tmp_path):
    """lora_llama_zoo: lognorm equals log‖ΔW‖ of the loaded adapter; lora_predict on a custom column."""
    (tmp_path / "z.toml").write_text('task = "lora_llama_zoo"\nn_adapters = 6\n')
    zoo = run_spec(tmp_path / "z.toml", tmp_path / "zoo", progress=False)
    rows = list(csv.DictReader(open(zoo / "labels.csv")))
    assert [int(r["rank"]) for r in rows] == [2, 4, 8, 2, 4, 8]
    ad = lora.load_adapter(zoo / "adapters" / rows[4]["adapter"], dtype=torch.float64)
    sq = sum(float((d ** 2).sum()) for d in ad.deltas().values())
    assert float(rows[4]["lognorm"]) == pytest.approx(0.5 * math.log(sq), rel=1e-5)
    (tmp_path / "p.toml").write_text(f'task = "lora_predict"\nzoo = "{zoo}"\ntarget = "lognorm"\nseeds = [0]\n'
                                     'models = ["GLNet", "SVDMLP"]\nmax_rank = 8\n[train]\nepochs = 2\n')
    out = run_spec(tmp_path / "p.toml", tmp_path / "run", progress=False)
    s = json.loads((out / "metrics.json").read_text())["summary"]
    assert "GLNet/r2_mean" in s and "speed/speedup_disk" not in s
    (tmp_path / "bad.toml").write_text((tmp_path / "p.toml").read_text().replace('"lognorm"', '"nope"'))
    with pytest.raises(SpecError, match="'nope' is neither one of"):
        run_spec(tmp_path / "bad.toml", tmp_path / "run2", progress=False)
