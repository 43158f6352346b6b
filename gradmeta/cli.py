"""The ``gradmeta`` command: ``run SPEC.toml``, ``report DIR``, ``tasks``, plus the subcommands of
:mod:`gradmeta.commands` (``curvature``, ``inr``, ``lora`` and any registered through the
``gradmeta.commands`` entry-point group).

Exit status: 0 success; 2 a user mistake -- a bad spec, file, checkpoint, data file or run folder
(one line ``gradmeta COMMAND: error: ...`` on stderr naming the culprit; ``gradmeta --debug ...``
or ``GRADMETA_DEBUG=1`` shows the traceback instead); 3 a run diverged (non-finite loss); 130
interrupted (Ctrl-C); 141 the reader of the output went away (``gradmeta report DIR | head``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import math
import sys
from pathlib import Path

from gradmeta._io import CheckpointError
from gradmeta.run import (CHECKPOINT_FILE, METRICS_FILE, RunDiverged, RunFolderError, default_out_dir,
                          run_spec)
from gradmeta.specs import SpecError, discover_tasks

__all__ = ["main", "build_parser", "format_report", "user_errors", "positive"]

#: Error types of the library packages that mean "bad input", as (module, name); imported when needed.
_DOMAIN_ERRORS = (("gradmeta.data", "DataFormatError"), ("gradmeta.curvature", "CurvatureError"),
                  ("gradmeta.commands.curvature", "CLIError"), ("gradmeta.lora", "AdapterFormatError"),
                  ("gradmeta.lora", "AdapterMismatchError"), ("gradmeta.inr", "ZooError"),
                  ("gradmeta.grads", "GradientCollectionError"), ("gradmeta.nn", "SymmetrySpecError"))


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that the command reports as one line with exit status 2."""
    out = [SpecError, RunFolderError, CheckpointError, FileNotFoundError, PermissionError,
           IsADirectoryError, NotADirectoryError]
    for module, name in _DOMAIN_ERRORS:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # an optional package that is not installed
            pass
    return tuple(out)


def positive(kind: type = int):
    """An ``argparse`` type: ``kind(text)`` that must be finite and > 0 (else a usage error, exit 2)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return "nan" if math.isnan(x) else f"{x:.4g}"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def _read_metrics(path: Path) -> dict:
    """``metrics.json`` as a dict with a dict ``summary``, a dict of dicts ``history`` and a list ``plots``."""
    redo = (" (a checkpoint exists: delete the file and resume the run to write it again)"
            if (path.parent / CHECKPOINT_FILE).exists() else "")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is not valid JSON ({e}); it was damaged or not written by gradmeta{redo}") from None
    shapes = {"summary": dict, "history": dict, "plots": list}
    bad = ["the top level is not an object"] if not isinstance(m, dict) else [
        f"{k!r} is not {'an object' if t is dict else 'a list'}" for k, t in shapes.items()
        if not isinstance(m.get(k, t()), t)]
    if not bad and not all(isinstance(p, str) for p in m.get("plots", [])):
        bad = ["'plots' is not a list of file names"]
    if not bad and not all(isinstance(v, dict) and all(isinstance(x, list) for x in v.values())
                           for v in m.get("history", {}).values()):
        bad = ["'history' is not an object of {name: list} objects"]
    if bad:
        raise RunFolderError(f"{path} is not a gradmeta metrics file: {bad[0]}{redo}")
    return m


def format_report(run_dir: str | Path) -> str:
    """Compact text summary of a run folder's ``metrics.json``: status, summary, series, plots."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.exists():
        hint = " (a checkpoint exists: the run was interrupted; resume it)" if (run_dir / CHECKPOINT_FILE).exists() else ""
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a gradmeta run folder?{hint}")
    m = _read_metrics(path)
    out = [f"run {run_dir}: task {m.get('task')}, {m.get('status')}, step {m.get('step')}/{m.get('total_steps')}"]
    summary = m.get("summary", {})
    if summary:
        out += ["", *_table([[k, _fmt(v)] for k, v in summary.items()], ["summary", "value"])]
    for group, series in m.get("history", {}).items():
        rows = []
        for name, values in series.items():
            nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if name == "step" or not nums:
                continue
            rows.append([name, str(len(values)), _fmt(values[0]), _fmt(values[-1]), _fmt(min(nums)), _fmt(max(nums))])
        if rows:
            out += ["", *_table(rows, [f"history: {group}", "n", "first", "last", "min", "max"])]
    plots = m.get("plots", [])
    out += ["", "plots:" if plots else "plots: none"]
    out += [f"  {run_dir / p}{'' if (run_dir / p).exists() else '  (missing)'}" for p in plots]
    return "\n".join(out)


def _cmd_run(args) -> int:
    out = Path(args.out) if args.out else default_out_dir(args.spec)
    try:
        run_dir = run_spec(args.spec, out, resume=args.resume, overwrite=args.overwrite,
                           max_steps=args.max_steps, progress=False if args.no_progress else None,
                           overrides=args.set)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue from the last checkpoint with: gradmeta run {args.spec} --out {out} --resume",
              file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) > 0:
        return 0  # under torchrun, rank 0 reports
    m = json.loads((run_dir / METRICS_FILE).read_text())
    if m["status"] == "stopped":
        print(f"stopped at step {m['step']} of {m['total_steps']}; continue with: "
              f"gradmeta run {args.spec} --out {run_dir} --resume")
    else:
        print(f"done: {run_dir} (see: gradmeta report {run_dir})")
    return 0


def _cmd_report(args) -> int:
    print(format_report(args.dir))
    return 0


def _cmd_tasks(args) -> int:
    for name, info in sorted(discover_tasks().items()):
        print(f"{name:24s} {info.doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, including the subcommands of :mod:`gradmeta.commands`."""
    parser = argparse.ArgumentParser(
        prog="gradmeta", description="Run gradmeta task specs and summarise run folders.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: GRADMETA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("run", help="run a task spec into a run folder")
    p.add_argument("spec", help="TOML spec file (its key `task` names the task)")
    p.add_argument("--out", help="run folder (default: runs/<spec stem>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the folder's last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete an earlier run in the folder first")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after global step N (checkpointed); continue later with --resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, parsed as TOML (e.g. --set train.steps=250 --set 'seeds=[0,1]'); "
                        "repeatable, recorded in spec.resolved.toml")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("report", help="summarise a run folder's metrics.json and list its plots")
    p.add_argument("dir", help="run folder")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("tasks", help="list registered tasks")
    p.set_defaults(func=_cmd_tasks)
    from gradmeta.commands import command_modules

    for module in command_modules():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for spec, resume and missing-file errors)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("GRADMETA_DEBUG", "") not in ("", "0")
    from gradmeta._runtime import close_distributed

    status = None
    try:
        status = _run(args, debug)
        return status
    finally:
        close_distributed(ok=status == 0)  # under torchrun: the group is torn down before the process exits


def _run(args, debug: bool) -> int:
    """Run the parsed command ``args``; its failures become exit statuses (see :func:`main`)."""
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
    except BrokenPipeError:
        # The reader left (`gradmeta report DIR | head`): silence the final flush and stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"\ngradmeta {args.command}: interrupted", file=sys.stderr)
        return 130
    except RunDiverged as e:
        if debug:
            raise
        print(f"gradmeta {args.command}: error: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        if debug or not isinstance(e, user_errors()):
            raise
        print(f"gradmeta {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0 if status is None else int(status)


def entry() -> int:
    """The ``gradmeta`` command and ``python -m gradmeta``: :func:`main` in a process whose CPU
    allocator keeps freed memory for reuse (``gradmeta.keep_freed_cpu_memory``: training steps
    1.2–1.9× faster on a CPU in the benchmarks), unless ``GRADMETA_KEEP_FREED_MEMORY=0``. Calling :func:`main`
    from Python leaves the allocator as it is."""
    if os.environ.get("GRADMETA_KEEP_FREED_MEMORY", "1") != "0":
        from gradmeta._runtime import keep_freed_cpu_memory

        keep_freed_cpu_memory()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
