"""Task specs: TOML files naming a registered task and the values that differ from its defaults.

A spec's key ``task`` names a task registered with :func:`register_task`; every other key is
checked against that task's defaults (unknown keys, missing required keys and wrong types are
errors naming the spec file and the dotted key, with a "did you mean" for misspelt keys and for
keys put in the wrong table).

Two ways to avoid copying a spec:

* ``extends = "base.toml"`` (a path relative to the spec's folder): the base is read first and the
  spec's tables are merged into it key by key; bases may extend further bases (a cycle is an error
  naming the files);
* overrides, ``--set train.steps=250 --set seeds=[0,1,2]`` on the command line or
  ``overrides=[...]`` in :func:`load_spec`: each value is parsed as TOML (a bare word that is not
  valid TOML is taken as a string) and checked like a value from the file.

Tasks are discovered on first lookup: importing :mod:`gradmeta.experiments` registers the built-in
ones, and any installed package may add its own through the ``gradmeta.tasks`` entry-point group
(each entry point names a module that calls :func:`register_task` when imported).
"""
from __future__ import annotations

import difflib
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["SpecError", "Required", "OneOf", "Range", "NonEmpty", "TaskInfo", "TASKS", "register_task", "get_task", "discover_tasks",
           "load_spec", "parse_override", "apply_overrides", "resolve_spec", "dump_toml", "spec_diff"]

#: Entry-point group through which other packages add tasks.
ENTRY_POINT_GROUP = "gradmeta.tasks"


class SpecError(ValueError):
    """A spec is malformed: unknown task or key, missing key, a value of the wrong type or range."""


@dataclass(frozen=True)
class Required:
    """Default marker for a key that the spec must set; ``type`` is the expected Python type."""

    type: type
    doc: str = ""


@dataclass(frozen=True)
class OneOf:
    """Default marker for a string key restricted to ``options``."""

    default: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Range:
    """Default marker for a number restricted to ``[low, high]`` (either bound may be ``None``).

    ``Range(1e-3, low=0, low_open=True)`` is a positive float defaulting to ``1e-3``;
    ``Range(100, low=1)`` an integer >= 1. The type of ``default`` fixes the value's type (an int
    default accepts only integers). Floats must be finite. In arrays, ``[Range(0, low=0)]`` checks
    every element.
    """

    default: int | float
    low: int | float | None = None
    high: int | float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high}")
        return " and ".join(parts) or "finite"

    def contains(self, v: float) -> bool:
        if v != v or v in (float("inf"), float("-inf")):
            return False
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            return False
        return True


@dataclass(frozen=True)
class NonEmpty:
    """Default marker for an array that must hold at least one element.

    ``NonEmpty([Range(0, low=0), 1, 2])``: seeds, default ``[0, 1, 2]``, each an integer >= 0.
    """

    default: list


@dataclass(frozen=True)
class TaskInfo:
    """A registered task: its function, nested defaults and first docstring line."""

    name: str
    fn: Callable
    defaults: dict = field(repr=False)
    doc: str = ""


TASKS: dict[str, TaskInfo] = {}
_discovered = False


def register_task(name: str, *, defaults: dict) -> Callable:
    """Decorator registering ``fn(run) -> dict`` as task ``name`` (the spec's ``task = "name"``).

    ``defaults`` is a nested dict of default values (tables are dicts); a value may be
    :class:`Required` (the spec must set it) or :class:`OneOf` (a restricted string).
    """
    def deco(fn: Callable) -> Callable:
        old = TASKS.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"task {name!r} is already registered by {old.fn.__module__}")
        doc = (fn.__doc__ or "").strip().splitlines()
        TASKS[name] = TaskInfo(name, fn, defaults, doc[0] if doc else "")
        return fn
    return deco


def discover_tasks() -> dict[str, TaskInfo]:
    """Import the built-in experiments and every ``gradmeta.tasks`` entry point (once); return :data:`TASKS`."""
    global _discovered
    if not _discovered:
        _discovered = True
        importlib.import_module("gradmeta.experiments")
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            ep.load()
    return TASKS


def get_task(name: str, spec_path: str | os.PathLike | None = None) -> TaskInfo:
    """Return the task registered as ``name``; :class:`SpecError` (with close matches) if none."""
    if name not in TASKS:
        discover_tasks()
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        where = f"{spec_path}: " if spec_path else ""
        raise SpecError(f"{where}unknown task {name!r}{hint} Known tasks: {', '.join(sorted(TASKS)) or 'none'}.")
    return TASKS[name]


# ------------------------------------------------------------------------------------------ reading

def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except IsADirectoryError:
        raise SpecError(f"spec file {path} is a folder, not a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file") from None


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_chain(path: Path, seen: tuple[Path, ...]) -> dict:
    real = path.resolve()
    if real in seen:
        chain = " -> ".join(str(p) for p in (*seen, real))
        raise SpecError(f"spec files extend each other in a cycle: {chain}")
    raw = _read_toml(path)
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise SpecError(f"{path}: extends = {base!r} must be a string (a spec path relative to {path.parent})")
    base_path = path.parent / base
    if not base_path.is_file():
        raise SpecError(f"{path}: extends = {base!r}, but {base_path} does not exist")
    return _deep_merge(_load_chain(base_path, (*seen, real)), raw)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.steps=250"`` -> ``(["train", "steps"], 250)``; the value is parsed as TOML
    (``[0, 1]``, ``true``, ``"text"``, ``1e-3``), a bare word that is not TOML as a string."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=250")
    key, text = item.split("=", 1)
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys):
        raise SpecError(f"--set {item!r}: {key.strip()!r} is not a dotted key such as train.steps")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        if not re.fullmatch(r"[^\s\[\]{}=\"',]+", text.strip()):
            raise SpecError(f"--set {item!r}: {text.strip()!r} is not a TOML value "
                            "(quote strings, write arrays as [1, 2])") from None
        value = text.strip()
    return keys, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` with each ``KEY=VALUE`` of ``overrides`` set (tables created as needed)."""
    out = _deep_merge({}, raw)
    for item in overrides:
        keys, value = parse_override(item)
        d = out
        for k in keys[:-1]:
            nxt = d.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise SpecError(f"--set {item!r}: {k!r} is a value, not a table")
            d = nxt
        d[keys[-1]] = value
    return out


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Parse a TOML spec, following ``extends`` and applying ``overrides`` (``KEY=VALUE`` strings).

    Raises :class:`SpecError` naming the file on a missing file, bad TOML, a bad ``extends`` or a
    malformed override. Values are checked later, by :func:`resolve_spec`.
    """
    raw = _load_chain(Path(path), ())
    return apply_overrides(raw, overrides) if overrides else raw


# --------------------------------------------------------------------------------------- resolving

def _type_name(t: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            list: "an array", dict: "a table"}.get(t, t.__name__)


def _check_value(value: Any, default: Any, key: str, where: str, root: dict) -> Any:
    """Return ``value`` converted to the type of ``default`` (int -> float allowed), or raise."""
    if isinstance(default, Required):
        expected = default.type
        default = {int: 0, float: 0.0, str: "", bool: False, list: [], dict: {}}.get(expected, None)
    if isinstance(default, NonEmpty):
        value = _check_value(value, default.default, key, where, root)
        if not value:
            raise SpecError(f"{where}: {key} = [] must hold at least one element")
        return value
    if isinstance(default, Range):
        value = _check_value(value, default.default, key, where, root)
        if not default.contains(value):
            raise SpecError(f"{where}: {key} = {value!r} is out of range; it must be {default.describe()}")
        return value
    if isinstance(default, OneOf):
        if not isinstance(value, str) or value not in default.options:
            raise SpecError(f"{where}: {key} = {value!r}; expected one of {', '.join(map(repr, default.options))}")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: {key} must be a table ([{key}]), got {value!r}")
        return _merge(value, default, where, root, key + ".")
    bad = SpecError(f"{where}: {key} = {value!r} must be {_type_name(type(default))}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if value != value or value in (float("inf"), float("-inf")):
            if default == default and default not in (float("inf"), float("-inf")):
                raise SpecError(f"{where}: {key} = {value!r} must be a finite number")
        return float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise bad
        if default:  # the default's first element fixes the element type (and range)
            return [_check_value(v, default[0], f"{key}[{i}]", where, root) for i, v in enumerate(value)]
    return value


def _all_keys(defaults: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in defaults.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _all_keys(v, prefix + k + ".")
    return out


def _merge(raw: dict, defaults: dict, where: str, root: dict, prefix: str = "") -> dict:
    unknown = [k for k in raw if k not in defaults]
    if unknown:
        k = unknown[0]
        elsewhere = [p for p in _all_keys(root) if p.rsplit(".", 1)[-1] == k and p != prefix + k]
        close = elsewhere or [prefix + c for c in difflib.get_close_matches(k, list(defaults), n=1)]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(f"{where}: unknown key {prefix + k!r}{hint}; allowed here: {', '.join(defaults)}")
    out = {}
    for k, default in defaults.items():
        key = prefix + k
        if k in raw:
            out[k] = _check_value(raw[k], default, key, where, root)
        elif isinstance(default, Required):
            raise SpecError(f"{where}: missing required key {key!r} ({_type_name(default.type)}"
                            f"{': ' + default.doc if default.doc else ''})")
        elif isinstance(default, (OneOf, Range)):
            out[k] = default.default
        elif isinstance(default, NonEmpty):
            out[k] = [x.default if isinstance(x, Range) else x for x in default.default]
        elif isinstance(default, dict):
            out[k] = _merge({}, default, where, root, key + ".")
        else:
            out[k] = [x.default if isinstance(x, Range) else x for x in default] if isinstance(default, list) else default
    return out


def resolve_spec(raw: dict, spec_path: str | os.PathLike = "<spec>") -> dict:
    """Check ``raw`` against its task's defaults; return the full spec with ``task`` first."""
    if "task" not in raw:
        raise SpecError(f"{spec_path}: missing required key 'task' (the name of a registered task)")
    if not isinstance(raw["task"], str):
        raise SpecError(f"{spec_path}: task = {raw['task']!r} must be a string")
    info = get_task(raw["task"], spec_path)
    body = {k: v for k, v in raw.items() if k != "task"}
    return {"task": info.name, **_merge(body, info.defaults, str(spec_path), info.defaults)}


# ---------------------------------------------------------------------------------------- writing

def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # repr of a float is valid TOML, including inf and nan
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(spec: dict, _prefix: str = "") -> str:
    """Write a nested dict of bools, numbers, strings and lists as TOML (scalars before tables)."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    for k, v in spec.items():
        if isinstance(v, dict):
            name = _prefix + _toml_key(k)
            lines += ["", f"[{name}]", dump_toml(v, name + ".").strip("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def spec_diff(old: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every dotted key whose value differs between two specs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
