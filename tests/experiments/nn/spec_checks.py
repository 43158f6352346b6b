"""Checks shared by the tests of the shipped specs: a spec resolves and holds only what differs."""
from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from gradmeta.specs import OneOf, Range, Required, get_task, load_spec, resolve_spec

TASKS_DIR = Path(__file__).resolve().parents[3] / "tasks"


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + k + ".")
        else:
            yield prefix + k, v


def _at(d: dict, key: str):
    for k in key.split("."):
        d = d[k]
    return d


def _default(defaults: dict, key: str):
    v = _at(defaults, key)
    if isinstance(v, Required):
        return Required
    if isinstance(v, (OneOf, Range)):
        return v.default
    return [x.default if isinstance(x, Range) else x for x in v] if isinstance(v, list) else v


def check_minimal(name: str) -> dict:
    """Resolve ``tasks/<name>`` and assert that every key it sets differs from its base's value
    (``extends``) or, without a base, from the task's default. Returns the resolved spec."""
    path = TASKS_DIR / name
    resolved = resolve_spec(load_spec(path), path)
    own = tomllib.loads(path.read_text())
    base = own.pop("extends", None)
    own.pop("task", None)
    if base is not None:
        base_spec = resolve_spec(load_spec(path.parent / base), path.parent / base)
        ref = lambda key: _at(base_spec, key)  # noqa: E731
    else:
        defaults = get_task(resolved["task"]).defaults
        ref = lambda key: _default(defaults, key)  # noqa: E731
    repeated = [key for key, value in _leaves(own) if value == ref(key)]
    assert not repeated, f"{name} repeats its {'base' if base else 'defaults'} at {repeated}"
    return resolved
