"""A learned-optimizer table (task ``lopt_table``), end to end (resumable).

The table spec (default ``tasks/lopt_fmnist_table.toml``) names the rows: its ``rows`` are the stems of
the meta-training specs next to it and its ``runs_root`` the folder of their runs.

1. meta-trains every row spec × meta-training seed (``gradmeta run <spec> --set seed=S``) into
   ``<runs_root>/<spec stem>_s<S>``, one after the other, resuming a folder that has a checkpoint
   and skipping one that is complete;
2. runs the table spec (task ``lopt_table``): tuned Adam, tuned SGDM and every learned optimizer
   on the held-out seeds;
3. copies its ``metrics.json`` (plus the meta-training wall times), ``table.md`` and
   ``curves.png`` to ``benchmarks/results/<name>.{json,md,png}``.

    python benchmarks/lopt_table.py                                # the Fashion-MNIST table (real data)
    python benchmarks/lopt_table.py tasks/lopt_digits_table.toml   # the digits table
    python benchmarks/lopt_table.py --set outer.iterations=10      # a smaller budget

Every process runs on one thread (``OMP_NUM_THREADS=1``, spec ``threads = 1``). Step 1 runs in
``gradmeta run`` subprocesses and step 2 in this process: code patched into this process at run
time reaches the evaluation but not the meta-training (a patch meant for both must be importable
by every Python process, e.g. from a ``sitecustomize`` module on ``PYTHONPATH``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TABLE = ROOT / "tasks" / "lopt_fmnist_table.toml"


def _status(folder: Path) -> str | None:
    try:
        return json.loads((folder / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def meta_train(specs: list[Path], seeds: list[int], runs_root: Path, overrides: list[str], log=print) -> dict:
    """Run every spec × seed not yet complete (seed-major, so a partial table covers every row);
    returns ``{folder name: wall seconds of its meta-training}``."""
    walls = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for seed in seeds:
        for spec in specs:
            out = runs_root / f"{spec.stem}_s{seed}"
            if _status(out) != "complete":
                cmd = [sys.executable, "-m", "gradmeta", "run", str(spec), "--out", str(out), "--no-progress",
                       "--set", f"seed={seed}", *[a for o in overrides for a in ("--set", o)]]
                if (out / "checkpoint.pt").exists():
                    cmd.append("--resume")
                t0 = time.time()
                log(f"meta-training {out.name} ...")
                subprocess.run(cmd, cwd=ROOT, env=env, check=True)
                log(f"meta-training {out.name}: {time.time() - t0:.0f} s")
            walls[out.name] = json.loads((out / "run.json").read_text()).get("wall_s_total")
    return walls


def table_defaults(table: Path, table_set: list[str]) -> dict:
    """``{rows, runs_root, name}`` of a ``lopt_table`` spec (after ``table_set`` overrides): its row
    specs ``<spec folder>/<row>.toml``, its ``runs_root`` (relative to the repository root) and its stem.

    Raises:
        ValueError: naming the spec, if it is not a ``lopt_table`` spec, has no rows or a row has no spec file.
    """
    from gradmeta.specs import load_spec, resolve_spec

    spec = resolve_spec(load_spec(table, table_set), table)
    if spec.get("task") != "lopt_table":
        raise ValueError(f"{table}: task = {spec.get('task')!r}, not 'lopt_table'")
    rows = [table.parent / f"{r}.toml" for r in spec["rows"] if r]
    if not rows:
        raise ValueError(f"{table}: rows is empty; name the meta-training specs (their stems)")
    absent = [str(r) for r in rows if not r.is_file()]
    if absent:
        raise ValueError(f"{table}: no meta-training spec for rows {absent}")
    return {"rows": rows, "runs_root": ROOT / spec["runs_root"], "name": table.stem}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", nargs="?", default=str(DEFAULT_TABLE), help="the lopt_table spec (default: %(default)s)")
    p.add_argument("--table", dest="table_opt", help="the lopt_table spec (same as the positional argument)")
    p.add_argument("--rows", nargs="+", help="meta-training specs, in the table spec's row order "
                   "(default: <table folder>/<row>.toml for the table's rows)")
    p.add_argument("--meta-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs-root", help="folder of the run folders (default: the table's runs_root)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="KEY=VALUE override for every meta-training spec (e.g. outer.iterations=10)")
    p.add_argument("--table-set", action="append", default=[], help="KEY=VALUE override for the table spec")
    p.add_argument("--name", help="stem of the files in --results (default: the table spec's stem)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--skip-train", action="store_true", help="only evaluate the run folders there are")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from gradmeta.run import run_spec

    table = Path(a.table_opt or a.table)
    d = table_defaults(table, a.table_set)
    runs_root = Path(a.runs_root) if a.runs_root else d["runs_root"]
    specs = [Path(s) for s in a.rows] if a.rows else d["rows"]
    name = a.name or d["name"]
    walls = {} if a.skip_train else meta_train(specs, a.meta_seeds, runs_root, a.overrides)
    overrides = [f'runs_root="{runs_root}"', f"meta_seeds={a.meta_seeds}",
                 f"rows={json.dumps([s.stem for s in specs])}", *a.table_set]
    out = run_spec(table, runs_root / "table", overwrite=True, progress=False, overrides=overrides)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["meta_training_wall_s"] = walls or {f.name: json.loads((f / "run.json").read_text()).get("wall_s_total")
                                                for f in sorted(runs_root.glob("*_s*")) if (f / "run.json").exists()}
    metrics["environment"] = json.loads((out / "run.json").read_text()).get("environment")
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / f"{name}.json").write_text(json.dumps(metrics, indent=1) + "\n")
    shutil.copyfile(out / "table.md", res / f"{name}.md")
    shutil.copyfile(out / "curves.png", res / f"{name}.png")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
