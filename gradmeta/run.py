"""Run a task spec (TOML) into a run folder.

A *spec* is a TOML file whose key ``task`` names a registered task; every other key is checked
against the task's defaults (unknown keys, missing required keys and wrong types are errors that
name the spec file and the dotted key). A *run folder* holds:

* ``spec.resolved.toml`` -- the spec with every default filled in (itself a valid spec);
* ``run.json`` -- environment record (versions, device) and one entry per invocation;
* ``metrics.json`` -- ``{"task", "status", "step", "total_steps", "summary", "history", "plots"}``;
* ``*.png`` -- plots; ``checkpoint.pt`` -- the latest checkpoint.

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written checkpoint. ``resume=True`` continues from the last
checkpoint and refuses when the resolved spec differs from the one stored in the folder.

Tasks are functions ``fn(run: Run) -> dict`` registered with :func:`register_task`; they return
``{"summary": {name: scalar}, "history": {group: {name: list}}, "plots": [file names]}``.
"""
from __future__ import annotations

import contextlib
import datetime
import difflib
import importlib
import json
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import torch

__all__ = [
    "SpecError", "ResumeError", "Required", "OneOf", "TaskInfo", "TASKS", "TASK_MODULES",
    "register_task", "get_task", "load_spec", "resolve_spec", "dump_toml", "atomic_write", "torch_threads",
    "Run", "run_spec", "default_out_dir", "environment",
]

#: Modules imported (lazily, on first lookup) so that their tasks register themselves.
#: A module that does not exist yet is skipped; any other import error surfaces.
TASK_MODULES: list[str] = ["gradmeta.experiments", "gradmeta.experiments.capability", "gradmeta.lopt._experiments", "gradmeta.lora._zoo",
                            "gradmeta.lora._tasks", "gradmeta.inr._experiments",
                            "gradmeta.curvature._learned_task"]

SPEC_FILE, RUN_FILE, METRICS_FILE, CHECKPOINT_FILE = (
    "spec.resolved.toml", "run.json", "metrics.json", "checkpoint.pt")


class SpecError(ValueError):
    """A spec file is malformed: unknown task or key, missing key, or a value of the wrong type."""


class ResumeError(RuntimeError):
    """A run folder cannot be (re)used as asked: spec changed, or a run exists and neither resume nor overwrite."""


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
class TaskInfo:
    """A registered task: its function, nested defaults and first docstring line."""

    name: str
    fn: Callable[["Run"], dict]
    defaults: dict = field(repr=False)
    doc: str = ""


TASKS: dict[str, TaskInfo] = {}


def register_task(name: str, *, defaults: dict) -> Callable:
    """Decorator registering ``fn(run: Run) -> dict`` as task ``name`` (the spec's ``task = "name"``).

    ``defaults`` is a nested dict of default values (tables are dicts); a value may be
    :class:`Required` (the spec must set it) or :class:`OneOf` (a restricted string).
    """
    def deco(fn: Callable) -> Callable:
        if name in TASKS and TASKS[name].fn is not fn:
            raise ValueError(f"task {name!r} is already registered by {TASKS[name].fn.__module__}")
        doc = (fn.__doc__ or "").strip().splitlines()
        TASKS[name] = TaskInfo(name, fn, defaults, doc[0] if doc else "")
        return fn
    return deco


def _import_optional(module: str) -> bool:
    """Import ``module``; False only when that exact module does not exist (errors inside it surface)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            return False
        raise
    return True


def get_task(name: str, spec_path: str | os.PathLike | None = None) -> TaskInfo:
    """Return the task registered as ``name``; :class:`SpecError` (with close matches) if none."""
    for module in TASK_MODULES:
        _import_optional(module)
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        where = f"{spec_path}: " if spec_path else ""
        raise SpecError(f"{where}unknown task {name!r}{hint} Known tasks: {', '.join(sorted(TASKS)) or 'none'}.")
    return TASKS[name]


def load_spec(path: str | os.PathLike) -> dict:
    """Parse a TOML spec file; :class:`SpecError` naming the file on a missing file or bad TOML."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: invalid TOML: {e}") from None


def _type_name(t: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            list: "an array", dict: "a table"}.get(t, t.__name__)


def _check_value(value: Any, default: Any, key: str, where: str) -> Any:
    """Return ``value`` converted to the type of ``default`` (int -> float allowed), or raise."""
    if isinstance(default, Required):
        expected = default.type
        default = {int: 0, float: 0.0, str: "", bool: False, list: [], dict: {}}.get(expected, None)
    if isinstance(default, OneOf):
        if not isinstance(value, str) or value not in default.options:
            raise SpecError(f"{where}: {key} = {value!r}; expected one of {', '.join(map(repr, default.options))}")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: {key} must be a table ([{key}]), got {value!r}")
        return _merge(value, default, where, key + ".")
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
        return float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise bad
        if default:  # the default's first element fixes the element type
            return [_check_value(v, default[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    return value


def _merge(raw: dict, defaults: dict, where: str, prefix: str = "") -> dict:
    unknown = [k for k in raw if k not in defaults]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(defaults), n=1)
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
        raise SpecError(f"{where}: unknown key {prefix + k!r}{hint}; allowed here: {', '.join(defaults)}")
    out = {}
    for k, default in defaults.items():
        key = prefix + k
        if k in raw:
            out[k] = _check_value(raw[k], default, key, where)
        elif isinstance(default, Required):
            raise SpecError(f"{where}: missing required key {key!r} ({_type_name(default.type)}"
                            f"{': ' + default.doc if default.doc else ''})")
        elif isinstance(default, OneOf):
            out[k] = default.default
        elif isinstance(default, dict):
            out[k] = _merge({}, default, where, key + ".")
        else:
            out[k] = list(default) if isinstance(default, list) else default
    return out


def resolve_spec(raw: dict, spec_path: str | os.PathLike = "<spec>") -> dict:
    """Check ``raw`` against its task's defaults; return the full spec with ``task`` first."""
    if "task" not in raw:
        raise SpecError(f"{spec_path}: missing required key 'task' (the name of a registered task)")
    if not isinstance(raw["task"], str):
        raise SpecError(f"{spec_path}: task = {raw['task']!r} must be a string")
    info = get_task(raw["task"], spec_path)
    body = {k: v for k, v in raw.items() if k != "task"}
    return {"task": info.name, **_merge(body, info.defaults, str(spec_path))}


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


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write ``path`` via ``write(file)`` into a temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _spec_diff(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def default_out_dir(spec_path: str | os.PathLike) -> Path:
    """``runs/<spec-stem>`` relative to the current directory."""
    return Path("runs") / Path(spec_path).stem


def environment() -> dict:
    """Versions and device of this process, recorded in ``run.json``."""
    import numpy

    import gradmeta

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "numpy": numpy.__version__, "gradmeta": gradmeta.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }


class Run:
    """One invocation of a task writing into a run folder.

    Args:
        out: the run folder (created if needed).
        spec: the resolved spec (from :func:`resolve_spec`).
        spec_path: where the spec came from, for error messages.
        resume: continue from ``checkpoint.pt`` if the folder holds one (the stored resolved
            spec must equal ``spec``); without a checkpoint the run starts at step 0.
        overwrite: delete the files of an earlier run in ``out`` and start again.
        max_steps: stop (after writing a checkpoint) once this global step is reached; a later
            ``resume`` continues from there. ``None``: run to the end.
        progress: show tqdm bars; ``None`` shows them only on a terminal.

    Raises:
        ResumeError: ``out`` holds a run and neither ``resume`` nor ``overwrite`` is set, or the
            stored spec differs from ``spec`` (the message lists the differing keys).
    """

    def __init__(self, out: str | os.PathLike, spec: dict, *, spec_path: str | os.PathLike = "<spec>",
                 resume: bool = False, overwrite: bool = False, max_steps: int | None = None,
                 progress: bool | None = None):
        self.out, self.spec, self.spec_path = Path(out), spec, str(spec_path)
        self.max_steps, self.stopped, self.start_step = max_steps, False, 0
        self._progress = progress
        # Under torchrun only rank 0 owns the folder; other ranks read checkpoints, write nothing.
        self.writer = int(os.environ.get("RANK", "0")) == 0
        if not self.writer:   # tasks that shard work may still write their own files here
            self.out.mkdir(parents=True, exist_ok=True)
            self.resumed = resume and (self.out / CHECKPOINT_FILE).exists()
            return
        existing = [n for n in (SPEC_FILE, CHECKPOINT_FILE, METRICS_FILE) if (self.out / n).exists()]
        if existing and resume:
            if (self.out / SPEC_FILE).exists():
                diff = _spec_diff(load_spec(self.out / SPEC_FILE), spec)
                if diff:
                    raise ResumeError(
                        f"cannot resume {self.out}: {self.spec_path} resolves to a different spec than the "
                        f"one stored in {self.out / SPEC_FILE}:\n  " + "\n  ".join(diff)
                        + "\nUse a new --out folder, or --overwrite to start this one again.")
        elif existing and overwrite:
            self._remove_previous()
        elif existing:
            raise ResumeError(f"{self.out} already holds a run ({', '.join(existing)}); pass --resume to "
                              f"continue it or --overwrite to start again")
        self.resumed = resume and (self.out / CHECKPOINT_FILE).exists()
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / SPEC_FILE, lambda f: f.write(dump_toml(spec)), mode="w")

    def _remove_previous(self) -> None:
        plots = []
        if (self.out / METRICS_FILE).exists():
            try:
                plots = json.loads((self.out / METRICS_FILE).read_text()).get("plots", [])
            except json.JSONDecodeError:
                pass
        for name in [SPEC_FILE, CHECKPOINT_FILE, METRICS_FILE, RUN_FILE, *plots]:
            p = self.out / Path(name).name  # never leave the run folder
            if p.is_file():
                p.unlink()

    def spec_error(self, key: str, message: str) -> SpecError:
        """A :class:`SpecError` naming the spec file and ``key`` (for task-specific checks)."""
        return SpecError(f"{self.spec_path}: {key}: {message}")

    def restore(self) -> dict | None:
        """The state passed to the last :meth:`checkpoint` when resuming, else ``None``."""
        if not self.resumed:
            return None
        path = self.out / CHECKPOINT_FILE
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file cannot come from atomic writes, but say which file
            raise ResumeError(f"cannot read checkpoint {path}: {e}") from e
        self.start_step = int(ckpt["step"])
        return ckpt["state"]

    def checkpoint(self, state: dict, step: int) -> None:
        """Atomically save ``state`` (tensors, numbers, strings, lists, dicts) as of global ``step``."""
        if self.writer:
            atomic_write(self.out / CHECKPOINT_FILE, lambda f: torch.save({"step": step, "state": state}, f))

    def should_stop(self, step: int) -> bool:
        """True once ``step`` reaches ``max_steps``; the task then checkpoints and returns early."""
        if self.max_steps is not None and step >= self.max_steps:
            self.stopped = True
        return self.stopped

    def pending(self, keys: list, done: dict, desc: str | None = None):
        """Yield the ``keys`` of independent jobs not yet in ``done`` (results restored on resume),
        with a progress bar, until :meth:`should_stop`; the caller adds each result to ``done``
        and checkpoints."""
        bar = self.progress(len(keys), initial=len(done), desc=desc)
        for key in keys:
            if key in done:
                continue
            if self.should_stop(len(done)):
                break
            yield key
            bar.update(1)
        bar.close()

    def progress(self, total: int, initial: int = 0, desc: str | None = None):
        """A tqdm bar over ``total`` steps starting at ``initial``."""
        from tqdm.auto import tqdm

        disable = None if self._progress is None else not self._progress
        return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)

    def save_figure(self, fig, name: str) -> str:
        """Write a matplotlib figure as PNG ``name`` in the run folder (atomically) and close it."""
        import matplotlib.pyplot as plt

        if self.writer:
            atomic_write(self.out / name, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        return name

    def write_metrics(self, metrics: dict) -> Path:
        """Atomically write ``metrics.json`` (NaN/inf are written as ``null``)."""
        text = json.dumps(_jsonable(metrics), indent=1, allow_nan=False)
        if not self.writer:
            return self.out / METRICS_FILE
        return atomic_write(self.out / METRICS_FILE, lambda f: f.write(text + "\n"), mode="w")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def run_spec(spec_path: str | os.PathLike, out: str | os.PathLike | None = None, *, resume: bool = False,
             overwrite: bool = False, max_steps: int | None = None, progress: bool | None = None) -> Path:
    """Resolve the spec at ``spec_path``, run its task into ``out`` and return the run folder.

    ``out`` defaults to ``runs/<spec-stem>``. The other arguments are those of :class:`Run`.
    The task's result is written to ``metrics.json`` with ``status`` ``"complete"`` or
    ``"stopped"`` (``max_steps`` reached; continue with ``resume=True``).
    """
    spec = resolve_spec(load_spec(spec_path), spec_path)
    out = Path(out) if out is not None else default_out_dir(spec_path)
    run = Run(out, spec, spec_path=spec_path, resume=resume, overwrite=overwrite,
              max_steps=max_steps, progress=progress)
    started = datetime.datetime.now(datetime.timezone.utc)
    result = TASKS[spec["task"]].fn(run)
    wall = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    missing = {"summary", "history", "plots", "step", "total_steps"} - set(result)
    if missing:
        raise RuntimeError(f"task {spec['task']!r} returned no {sorted(missing)} (see gradmeta.run docs)")
    status = "stopped" if result["step"] < result["total_steps"] else "complete"
    run.write_metrics({"task": spec["task"], "status": status, **result})
    if not run.writer:
        return out
    record = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else {}
    record.setdefault("spec_source", str(spec_path))
    record["environment"] = environment()
    record.setdefault("invocations", []).append({
        "started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:],
        "start_step": run.start_step, "end_step": result["step"], "status": status,
        "wall_s": round(wall, 3)})
    atomic_write(out / RUN_FILE, lambda f: f.write(json.dumps(record, indent=1) + "\n"), mode="w")
    return out
