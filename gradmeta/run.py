"""Run a task spec (TOML) into a run folder.

Specs (:mod:`gradmeta.specs`) name a registered task and the values that differ from its defaults.
A *run folder* holds:

* ``spec.resolved.toml`` -- the spec with every default filled in (itself a valid spec);
* ``run.json`` -- environment record (versions, device) and one entry per invocation;
* ``metrics.json`` -- ``{"task", "status", "step", "total_steps", "summary", "history", "plots"}``;
* ``*.png`` -- plots; ``checkpoint.pt`` -- the latest checkpoint;
* ``.lock`` -- while a process runs in the folder: its pid and host (a second process refuses to
  start; a lock left by a process that died is detected by its pid and replaced).

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written checkpoint; temporaries of killed processes are
removed when the folder is used again. ``resume=True`` continues from the last checkpoint and
refuses when the resolved spec differs from the one stored in the folder.

Tasks are functions ``fn(run: Run) -> dict`` registered with :func:`gradmeta.specs.register_task`;
they return ``{"summary": {name: scalar}, "history": {group: {name: list}}, "plots": [file names],
"step", "total_steps"}``. A task calls :meth:`Run.check_finite` on its training loss, so a run that
diverges stops with :class:`RunDiverged` instead of training on NaNs.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

import torch

from ._io import CheckpointError, atomic_write, jsonable, remove_stale_temps, safe_torch_load
from ._runtime import environment, torch_threads
from .specs import (TASKS, SpecError, dump_toml, get_task, load_spec, resolve_spec, spec_diff)

__all__ = ["SpecError", "RunFolderError", "ResumeError", "RunFolderLocked", "RunDiverged", "Run", "run_spec", "default_out_dir",
           "load_spec", "resolve_spec", "get_task"]

SPEC_FILE, RUN_FILE, METRICS_FILE, CHECKPOINT_FILE, LOCK_FILE = (
    "spec.resolved.toml", "run.json", "metrics.json", "checkpoint.pt", ".lock")


class RunFolderError(RuntimeError):
    """A run folder or one of its files cannot be used as asked; the message names the file."""


class ResumeError(RunFolderError):
    """A run folder cannot be (re)used as asked: spec changed, a run exists and neither resume nor
    overwrite, or its checkpoint cannot be resumed from."""


class RunFolderLocked(ResumeError):
    """Another live process is running in the run folder."""


class RunDiverged(RuntimeError):
    """A task met a non-finite loss (or other tracked value); the message names it and the step."""


def default_out_dir(spec_path: str | os.PathLike) -> Path:
    """``runs/<spec-stem>`` relative to the current directory."""
    stem = Path(spec_path).stem.strip(".")
    if not stem:
        raise SpecError(f"cannot name a run folder after {str(spec_path)!r}; pass --out")
    return Path("runs") / stem


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class _Lock:
    """An exclusive lock file ``out/.lock`` holding ``{"pid", "host", "started"}``."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.held = False
        self.replaced: dict | None = None

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                    pid, host = int(other["pid"]), str(other["host"])
                except (OSError, ValueError, KeyError, TypeError):
                    other, pid, host = {}, -1, "?"
                if host == me["host"] and pid != -1 and not _pid_alive(pid):
                    self.replaced = other  # the process that held it died (SIGKILL, power loss)
                    self.path.unlink(missing_ok=True)
                    continue
                if pid == -1:
                    raise RunFolderLocked(f"{self.path.parent} has an unreadable lock file {self.path}; if no "
                                          "gradmeta run is using this folder, delete that file") from None
                raise RunFolderLocked(
                    f"{self.path.parent} is in use by another gradmeta run (pid {pid} on {host}, started "
                    f"{other.get('started', '?')}); wait for it or use another --out. If that process is gone, "
                    f"delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise RunFolderLocked(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class Run:
    """One invocation of a task writing into a run folder.

    Args:
        out: the run folder (created if needed; resolved to an absolute path first).
        spec: the resolved spec (from :func:`gradmeta.specs.resolve_spec`).
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
        RunFolderLocked: another live process runs in ``out``.
    """

    def __init__(self, out: str | os.PathLike, spec: dict, *, spec_path: str | os.PathLike = "<spec>",
                 resume: bool = False, overwrite: bool = False, max_steps: int | None = None,
                 progress: bool | None = None):
        if max_steps is not None and max_steps < 0:
            raise SpecError(f"max_steps = {max_steps} must be >= 0")
        self.out, self.spec, self.spec_path = Path(os.path.abspath(out)), spec, str(spec_path)
        self.max_steps, self.stopped, self.start_step = max_steps, False, 0
        self._progress = progress
        self._lock = _Lock(self.out)
        self.fresh = False
        # Under torchrun only rank 0 owns the folder; other ranks read checkpoints, write nothing.
        self.writer = int(os.environ.get("RANK", "0")) == 0
        if not self.writer:   # tasks that shard work may still write their own files here
            self.out.mkdir(parents=True, exist_ok=True)
            self.resumed = resume and (self.out / CHECKPOINT_FILE).exists()
            return
        if self.out.exists() and not self.out.is_dir():
            raise ResumeError(f"--out {self.out} is a file, not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        if self._lock.replaced is not None:
            old = self._lock.replaced
            print(f"gradmeta: note: {self.out} was locked by pid {old.get('pid')} (started {old.get('started', '?')}), "
                  "which is no longer running; its lock was replaced", file=sys.stderr)
        try:
            self._claim(resume, overwrite)
        except BaseException:
            self._lock.release()
            raise

    def _claim(self, resume: bool, overwrite: bool) -> None:
        remove_stale_temps(self.out)
        existing = [n for n in (SPEC_FILE, CHECKPOINT_FILE, METRICS_FILE) if (self.out / n).exists()]
        if existing and resume:
            if (self.out / SPEC_FILE).exists():
                diff = spec_diff(load_spec(self.out / SPEC_FILE), self.spec)
                if diff:
                    raise ResumeError(
                        f"cannot resume {self.out}: {self.spec_path} resolves to a different spec than the "
                        f"one stored in {self.out / SPEC_FILE} ({'; '.join(diff)}); use a new --out folder, "
                        "or --overwrite to start this one again")
        elif existing and overwrite:
            self._remove_previous()
        elif existing:
            raise ResumeError(f"{self.out} already holds a run ({', '.join(existing)}); pass --resume to "
                              f"continue it or --overwrite to start again")
        self.fresh = not existing or overwrite
        self.resumed = resume and (self.out / CHECKPOINT_FILE).exists()
        atomic_write(self.out / SPEC_FILE, lambda f: f.write(dump_toml(self.spec)), mode="w")

    def close(self) -> None:
        """Release the run folder's lock (idempotent)."""
        self._lock.release()

    def discard(self) -> None:
        """Remove what this invocation created in a fresh folder (a start that failed its checks)."""
        if self.writer and self.fresh:
            for name in (SPEC_FILE, RUN_FILE):
                (self.out / name).unlink(missing_ok=True)

    def _remove_previous(self) -> None:
        plots = []
        if (self.out / METRICS_FILE).exists():
            try:
                plots = json.loads((self.out / METRICS_FILE).read_text()).get("plots", [])
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                pass
        for name in [SPEC_FILE, CHECKPOINT_FILE, METRICS_FILE, RUN_FILE, *plots]:
            p = self.out / Path(str(name)).name  # never leave the run folder
            if p.is_file():
                p.unlink()

    def spec_error(self, key: str, message: str) -> SpecError:
        """A :class:`SpecError` naming the spec file and ``key`` (for task-specific checks)."""
        return SpecError(f"{self.spec_path}: {key}: {message}")

    def restore(self, keys: tuple[str, ...] = ()) -> dict | None:
        """The state passed to the last :meth:`checkpoint` when resuming, else ``None``.

        Raises :class:`ResumeError` naming ``checkpoint.pt`` when the file cannot be loaded safely,
        lacks ``step`` / ``state``, or its state (a dict) lacks one of ``keys``.
        """
        if not self.resumed:
            return None
        path = self.out / CHECKPOINT_FILE
        try:
            ckpt = safe_torch_load(path, "run checkpoint")
        except CheckpointError as e:  # atomic writes never leave a partial file; a copied one might
            raise ResumeError(f"{e}; use --overwrite to start this run again") from None
        step = ckpt.get("step") if isinstance(ckpt, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or "state" not in ckpt:
            raise ResumeError(f"{path} is not a gradmeta run checkpoint (needs an integer 'step' and a "
                              "'state'); use --overwrite to start this run again")
        missing = [k for k in keys if not isinstance(ckpt["state"], dict) or k not in ckpt["state"]]
        if missing:
            raise self.checkpoint_error(f"its state has no {', '.join(map(repr, missing))}")
        self.start_step = step
        return ckpt["state"]

    def checkpoint_error(self, message: str) -> ResumeError:
        """A :class:`ResumeError` naming ``checkpoint.pt`` (for a state that does not fit the task)."""
        return ResumeError(f"{self.out / CHECKPOINT_FILE} does not fit task {self.spec.get('task')!r}: "
                           f"{message}; use --overwrite to start this run again")

    def check_finite(self, name: str, value, step: int) -> float:
        """Return ``value`` (a number or one-element tensor) as a float; raise :class:`RunDiverged`
        naming ``name`` and ``step`` if it is NaN or infinite."""
        v = float(value.detach() if isinstance(value, torch.Tensor) else value)
        if v != v or v in (float("inf"), float("-inf")):
            raise RunDiverged(f"{self.spec_path}: {name} = {v} at step {step}: the run diverged. Lower the "
                              f"learning rate (or check the data) and start again with --overwrite")
        return v

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
        text = json.dumps(jsonable(metrics), indent=1, allow_nan=False)
        if not self.writer:
            return self.out / METRICS_FILE
        return atomic_write(self.out / METRICS_FILE, lambda f: f.write(text + "\n"), mode="w")


def run_spec(spec_path: str | os.PathLike, out: str | os.PathLike | None = None, *, resume: bool = False,
             overwrite: bool = False, max_steps: int | None = None, progress: bool | None = None,
             overrides: list[str] | None = None) -> Path:
    """Resolve the spec at ``spec_path``, run its task into ``out`` and return the run folder.

    ``out`` defaults to ``runs/<spec-stem>``; ``overrides`` are ``KEY=VALUE`` strings applied on top
    of the file (see :func:`gradmeta.specs.load_spec`) and recorded in ``spec.resolved.toml``. The
    other arguments are those of :class:`Run`. The task's result is written to ``metrics.json``
    with ``status`` ``"complete"`` or ``"stopped"`` (``max_steps`` reached; continue with
    ``resume=True``).
    """
    spec = resolve_spec(load_spec(spec_path, overrides), spec_path)
    out = Path(out) if out is not None else default_out_dir(spec_path)
    run = Run(out, spec, spec_path=spec_path, resume=resume, overwrite=overwrite,
              max_steps=max_steps, progress=progress)
    try:
        return _execute(run, spec_path)
    except SpecError:
        run.discard()
        raise
    finally:
        run.close()


def _execute(run: Run, spec_path) -> Path:
    spec, out = run.spec, run.out
    started = datetime.datetime.now(datetime.timezone.utc)
    threads_before = torch.get_num_threads()
    threads = spec.get("threads")  # a task's top-level ``threads`` key is applied here, for every task
    with torch_threads(threads if isinstance(threads, int) and not isinstance(threads, bool) else None):
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
    env = environment()
    if isinstance(spec.get("threads"), int) and spec["threads"] > 0:
        env["torch_threads"] = spec["threads"]  # what the task ran with (it restores the caller's)
    else:
        env["torch_threads"] = threads_before
    record["environment"] = env
    invocations = record.setdefault("invocations", [])
    invocations.append({
        "started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:],
        "start_step": run.start_step, "end_step": result["step"], "status": status,
        "wall_s": round(wall, 3)})
    record["wall_s_total"] = round(sum(i.get("wall_s", 0.0) for i in invocations), 3)
    atomic_write(out / RUN_FILE, lambda f: f.write(json.dumps(record, indent=1) + "\n"), mode="w")
    return out
