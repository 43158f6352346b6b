"""Probes: out-of-range spec values are spec errors (exit 2) before anything runs."""
from __future__ import annotations

import os

import pytest

from .conftest import gm, one_line_error, write_spec

# (task, required keys, dotted key, bad value): counts, rates and seeds of every task but lopt's.
_REQUIRED = {"gradients_digits": {"train": {"steps": 5}}, "lora_predict": {"zoo": "z"}}
_BAD = [
    ("gradients_digits", "train.checkpoint_every", 0), ("gradients_digits", "train.eval_every", 0),
    ("gradients_digits", "collect.every", 0), ("gradients_digits", "train.batch_size", 0),
    ("gradients_digits", "train.lr", -1.0), ("gradients_digits", "threads", 0), ("gradients_digits", "seed", -1),
    ("nn_capability", "train.log_every", 0), ("nn_capability", "train.lr", 0.0),
    ("nn_capability", "train.batch_sets", 0),
    ("curvature_learned", "train.batch_size", 0), ("curvature_learned", "seeds", [0, -2]),
    ("curvature_learned_trace", "train.steps", 0), ("curvature_learned_trace", "data.lr", -1e-3),
    ("inr_editing", "train.batch_size", 0), ("inr_editing", "zoo.shard_size", 0), ("inr_editing", "zoo.steps", 0),
    ("lora_zoo", "finetune.ranks", [4, 0]), ("lora_zoo", "base.lr", 0.0), ("lora_zoo", "n_adapters", 0),
    ("lora_predict", "train.batch_size", 0), ("lora_predict", "test_fraction", 1.0),
]


def _set(spec: dict, dotted: str, value) -> dict:
    *tables, last = dotted.split(".")
    d = spec
    for t in tables:
        d = d.setdefault(t, {})
    d[last] = value
    return spec


@pytest.mark.parametrize("task,key,value", _BAD, ids=[f"{t}:{k}={v}" for t, k, v in _BAD])
def test_out_of_range_values_are_spec_errors(task, key, value):
    from gradmeta.specs import SpecError, resolve_spec

    raw = _set({"task": task, **{k: dict(v) if isinstance(v, dict) else v
                                 for k, v in _REQUIRED.get(task, {}).items()}}, key, value)
    with pytest.raises(SpecError, match=rf"x\.toml: {key}(\[\d\])? = .*(out of range|must be)"):
        resolve_spec(raw, "x.toml")


def test_infinite_learning_rate_in_file_exits_2(tmp_path, capsys):
    spec = write_spec(tmp_path, "task = 'gradients_digits'\n[train]\nsteps = 3\nlr = inf\n")
    assert gm("run", spec, "--out", tmp_path / "r", "--no-progress") == 2
    one_line_error(capsys, "train.lr = inf", "finite")
    assert not (tmp_path / "r" / "spec.resolved.toml").exists()


def test_negative_learning_rate_override_exits_2(tiny_spec, tmp_path, capsys):
    assert gm("run", tiny_spec, "--out", tmp_path / "r", "--set", "train.lr=-1", "--no-progress") == 2
    one_line_error(capsys, "train.lr = -1.0 is out of range", "> 0")


def test_checkpoint_every_zero_exits_2_not_zero_division(tmp_path, capsys):
    spec = write_spec(tmp_path, "task = 'gradients_digits'\n[train]\nsteps = 3\ncheckpoint_every = 0\n")
    assert gm("run", spec, "--out", tmp_path / "r", "--no-progress") == 2
    one_line_error(capsys, "train.checkpoint_every = 0")


def test_negative_max_steps_exits_2(tiny_spec, tmp_path, capsys):
    assert gm("run", tiny_spec, "--out", tmp_path / "r", "--max-steps", "-3", "--no-progress") == 2
    one_line_error(capsys, "max_steps = -3")
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_spec_named_dots_toml_never_runs_in_the_working_directory(tmp_path, capsys, monkeypatch):
    write_spec(tmp_path, name="...toml")
    (tmp_path / "metrics.json").write_text('{"mine": 1}\n')
    monkeypatch.chdir(tmp_path)
    assert gm("run", "...toml", "--no-progress") == 2
    one_line_error(capsys, "cannot name a run folder", "--out")
    assert (tmp_path / "metrics.json").read_text() == '{"mine": 1}\n'
    assert sorted(os.listdir(tmp_path)) == ["...toml", "metrics.json"]


def test_failed_start_leaves_no_run_behind(tmp_path, capsys):
    spec = write_spec(tmp_path, "task = 'gradients_digits'\n[model]\nwidths = [63, 10]\n[train]\nsteps = 3\n")
    out = tmp_path / "r"
    for _ in range(2):  # the second attempt fails for the same reason, not "already holds a run"
        assert gm("run", spec, "--out", out, "--no-progress") == 2
        one_line_error(capsys, "model.widths")
    assert not (out / "spec.resolved.toml").exists() and not (out / ".lock").exists()


@pytest.mark.parametrize("task", ["curvature_learned", "curvature_learned_trace", "inr_editing"])
def test_empty_seed_list_is_refused(task):
    from gradmeta.specs import SpecError, resolve_spec
    with pytest.raises(SpecError, match=r"seeds = \[\] must hold at least one element"):
        resolve_spec({"task": task, "seeds": []})
