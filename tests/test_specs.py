"""Every shipped spec in tasks/ names a registered task and resolves (keys, types, values)."""
from pathlib import Path

import pytest

from gradmeta.run import load_spec, resolve_spec

SPECS = sorted((Path(__file__).resolve().parents[1] / "tasks").glob("*.toml"))


def test_there_are_specs():
    assert len(SPECS) >= 5


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_resolves(path):
    spec = resolve_spec(load_spec(path), path)
    assert spec["task"]


# --- extends and overrides ------------------------------------------------------------------------

from gradmeta.specs import SpecError, apply_overrides, parse_override  # noqa: E402


def _write(folder, name, text):
    p = folder / name
    p.write_text(text)
    return p


def test_extends_chain_merges_tables_key_by_key(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path, "base.toml", 'task = "gradients_digits"\nseed = 3\n[train]\nsteps = 40\nlr = 0.01\n')
    _write(tmp_path / "sub", "mid.toml", 'extends = "../base.toml"\n[train]\nsteps = 20\n')
    leaf = _write(tmp_path / "sub", "leaf.toml", 'extends = "mid.toml"\n[model]\nwidths = [64, 8, 10]\n')
    raw = load_spec(leaf)
    assert raw == {"task": "gradients_digits", "seed": 3, "train": {"steps": 20, "lr": 0.01},
                   "model": {"widths": [64, 8, 10]}}
    spec = resolve_spec(raw, leaf)
    assert (spec["train"]["steps"], spec["train"]["lr"], spec["seed"], spec["model"]["widths"]) == (20, 0.01, 3, [64, 8, 10])


def test_extends_cycle_and_missing_base_name_the_files(tmp_path):
    a = _write(tmp_path, "a.toml", 'extends = "b.toml"\ntask = "gradients_digits"\n')
    _write(tmp_path, "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(SpecError, match=r"cycle: .*a\.toml -> .*b\.toml -> .*a\.toml"):
        load_spec(a)
    c = _write(tmp_path, "c.toml", 'extends = "nope.toml"\n')
    with pytest.raises(SpecError, match=r"c\.toml: extends = 'nope\.toml', but .*nope\.toml does not exist"):
        load_spec(c)
    d = _write(tmp_path, "d.toml", "extends = 3\n")
    with pytest.raises(SpecError, match="must be a string"):
        load_spec(d)


def test_overrides_are_toml_values_checked_like_file_values(tmp_path):
    spec = _write(tmp_path, "s.toml", 'task = "gradients_digits"\n[train]\nsteps = 40\n')
    raw = load_spec(spec, ["train.steps=7", "seed=[1]", "train.lr=1e-2"])
    assert raw["train"] == {"steps": 7, "lr": 0.01} and raw["seed"] == [1]
    with pytest.raises(SpecError, match=r"seed = \[1\] must be an integer"):
        resolve_spec(raw, spec)
    assert parse_override("data.name=digits") == (["data", "name"], "digits")  # bare word: a string
    assert parse_override('name="a b"') == (["name"], "a b")
    for bad, msg in [("steps", "expected KEY=VALUE"), ("a..b=1", "not a dotted key"), ("x=[1,", "not a TOML value")]:
        with pytest.raises(SpecError, match=msg):
            parse_override(bad)
    with pytest.raises(SpecError, match="'seed' is a value, not a table"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_key_in_the_wrong_table_points_to_the_right_one():
    with pytest.raises(SpecError, match=r"unknown key 'lr' \(did you mean 'train\.lr'\?\)"):
        resolve_spec({"task": "gradients_digits", "lr": 0.1})


def test_set_is_recorded_in_the_resolved_spec(tmp_path):
    from gradmeta.cli import main
    spec = _write(tmp_path, "s.toml", 'task = "gradients_digits"\nthreads = 1\n[train]\nsteps = 4\n'
                  'eval_every = 2\n[collect]\nevery = 2\nbatch_size = 16\n')
    assert main(["run", str(spec), "--out", str(tmp_path / "r"), "--no-progress", "--set", "train.steps=2"]) == 0
    stored = load_spec(tmp_path / "r" / "spec.resolved.toml")
    assert stored["train"]["steps"] == 2


def test_runner_applies_the_spec_threads_and_restores_them(tmp_path, monkeypatch):
    """Tasks do not set threads themselves: the runner applies a spec's top-level ``threads``."""
    import torch

    from gradmeta.run import run_spec
    from gradmeta.specs import TASKS
    info, seen = TASKS["gradients_digits"], []

    def spy(run):
        seen.append(torch.get_num_threads())
        return info.fn(run)

    monkeypatch.setitem(TASKS, "gradients_digits", type(info)(info.name, spy, info.defaults, info.doc))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        spec = _write(tmp_path, "s.toml", 'task = "gradients_digits"\nthreads = 1\n[train]\nsteps = 2\n'
                      'eval_every = 1\n[collect]\nevery = 1\nbatch_size = 16\n')
        run_spec(spec, tmp_path / "r", progress=False)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
