"""Smoke test of the ``inr_editing`` task through ``gradmeta.run`` (tiny budget), and its specs."""
import json
from pathlib import Path

import pytest

from gradmeta.run import SpecError, load_spec, resolve_spec, run_spec

ROOT = Path(__file__).resolve().parents[3]

TINY = """task = "inr_editing"
seeds = [0]
[data]
size = 8
train_limit = 6
test_limit = 3
edit = "dilation"
[zoo]
steps = 2
shard_size = 4
[editor]
features = ["weights", "gradients:bilinear"]
channels = 8
num_coords = 8
probe_grid = 4
[train]
steps = 2
batch_size = 4
"""


def test_inr_editing_task_runs_and_resumes(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    out = run_spec(spec, tmp_path / "run", max_steps=1, progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "stopped" and m["step"] == 1 and m["total_steps"] == 2
    out = run_spec(spec, tmp_path / "run", resume=True, progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["step"] == 2
    s = m["summary"]
    for f in ("weights", "gradients:bilinear"):
        assert s[f"mse/{f}"] >= 0 and s[f"seeds/{f}"] == 1
    assert s["zoo_size"] == 9 and s["identity_mse"] > 0 and "zoo_inrs_per_s" in s
    assert (out / "edits.png").exists() and (out / "zoo" / "index.json").exists()
    # every trained editor is written in the INREditor.save format, recording what it was trained for
    import gradmeta.inr as inr
    ed = inr.load_editor(out / "editors" / "gradients-bilinear-seed0.pt")
    t = ed.trained_for
    assert t["edit"] == "dilation" and t["image_size"] == [8, 8] and t["train"]["seed"] == 0
    assert t["heldout_mse"] == pytest.approx(s["mse/gradients:bilinear"])
    assert ed.features == "gradients" and ed.product == "bilinear"


def test_bad_spec_values_are_named(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text(TINY.replace('edit = "dilation"', 'edit = "blur"'))
    with pytest.raises(SpecError, match="data.edit"):
        run_spec(spec, tmp_path / "run", progress=False)
    spec.write_text(TINY.replace('"gradients:bilinear"', '"gradients:outer"'))
    with pytest.raises(SpecError, match="editor.features"):
        run_spec(spec, tmp_path / "run2", progress=False)


SPECS = ["inr_digits_dilation", "inr_digits_dilation_long", "inr_digits_dilation_products",
         "inr_digits_dilation_gradset_target", "inr_digits_dilation_gradset_grid", "inr_digits_dilation_auxzero",
         "inr_digits_dilation_budget", "inr_digits_dilation_zoo512",
         "inr_digits_dilation_zoo1024", "inr_mnist_dilation", "inr_cifar10_contrast",
         "inr_fashion_dilation", "inr_fashion_erosion", "inr_fashion_contrast"]


@pytest.mark.parametrize("name", SPECS)
def test_shipped_specs_resolve(name):
    path = ROOT / "tasks" / f"{name}.toml"
    assert resolve_spec(load_spec(path), path)["task"] == "inr_editing"
