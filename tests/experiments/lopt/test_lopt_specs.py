"""Every lopt spec resolves; each holds only what differs from its base / the task defaults."""
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import gradmeta.experiments  # noqa: F401  (registers the tasks)
from gradmeta.specs import TASKS, get_task, load_spec, resolve_spec

ROOT = Path(__file__).resolve().parents[3]
SPECS = sorted((ROOT / "tasks").glob("lopt_*.toml"))
CHECKPOINT_SPEC = ROOT / "gradmeta" / "lopt" / "checkpoints" / "lopt_digits.toml"


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_spec_resolves_and_sets_only_what_differs(path):
    spec = resolve_spec(load_spec(path), path)
    raw = tomllib.loads(path.read_text())
    get_task(raw.get("task", "lopt_meta_train"))  # discovers the built-in tasks
    base = raw.pop("extends", None)
    if base is not None:
        reference = resolve_spec(load_spec(path.parent / base), path.parent / base)
    else:
        reference = TASKS[raw["task"]].defaults
    ref = {k: getattr(v, "default", v) for k, v in _leaves(reference).items()}
    for key, value in _leaves(raw).items():
        if key != "task":
            assert ref[key] != value, f"{path.name}: {key} = {value!r} only repeats its base / the default"
    assert spec["task"] in TASKS


def test_shipped_checkpoint_spec_is_self_contained_and_is_the_base_spec():
    raw = tomllib.loads(CHECKPOINT_SPEC.read_text())
    assert "extends" not in raw
    assert resolve_spec(raw, CHECKPOINT_SPEC) == raw  # a complete, resolved spec
    assert raw == resolve_spec(load_spec(ROOT / "tasks" / "lopt_digits.toml"))
