"""The Fashion-MNIST learned-optimizer table, end to end (resumable).

1. meta-trains every row spec × meta-training seed (``gradmeta run <spec> --set seed=S``) into
   ``<runs_root>/<spec stem>_s<S>``, one after the other, resuming a folder that has a checkpoint
   and skipping one that is complete;
2. runs the table spec (task ``lopt_table``): tuned Adam, tuned SGDM and every learned optimizer
   on the held-out seeds;
3. copies its ``metrics.json`` (plus the meta-training wall times), ``table.md`` and
   ``curves.png`` to ``benchmarks/results/<name>.{json,md,png}``.

    python benchmarks/lopt_fmnist_table.py                       # the README table (real data)
    python benchmarks/lopt_fmnist_table.py --set outer.iterations=10   # a smaller budget

Every process runs on one thread (``OMP_NUM_THREADS=1``, spec ``threads = 1``).
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
ROWS = ("lopt_fmnist", "lopt_fmnist_gmn", "lopt_fmnist_weightspace", "lopt_fmnist_weightspace_gmn")


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default=str(ROOT / "tasks" / "lopt_fmnist_table.toml"), help="the lopt_table spec")
    p.add_argument("--rows", nargs="+", default=[str(ROOT / "tasks" / f"{r}.toml") for r in ROWS],
                   help="meta-training specs, in the table spec's row order")
    p.add_argument("--meta-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs-root", default=str(ROOT / "runs" / "lopt_fmnist_table"))
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="KEY=VALUE override for every meta-training spec (e.g. outer.iterations=10)")
    p.add_argument("--table-set", action="append", default=[], help="KEY=VALUE override for the table spec")
    p.add_argument("--name", default="lopt_fmnist_table", help="stem of the files in --results")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--skip-train", action="store_true", help="only evaluate the run folders there are")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from gradmeta.run import run_spec

    runs_root = Path(a.runs_root)
    specs = [Path(s) for s in a.rows]
    walls = {} if a.skip_train else meta_train(specs, a.meta_seeds, runs_root, a.overrides)
    overrides = [f'runs_root="{runs_root}"', f"meta_seeds={a.meta_seeds}",
                 f"rows={json.dumps([s.stem for s in specs])}", *a.table_set]
    out = run_spec(a.table, runs_root / "table", overwrite=True, progress=False, overrides=overrides)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["meta_training_wall_s"] = walls or {f.name: json.loads((f / "run.json").read_text()).get("wall_s_total")
                                                for f in sorted(runs_root.glob("*_s*")) if (f / "run.json").exists()}
    metrics["environment"] = json.loads((out / "run.json").read_text()).get("environment")
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / f"{a.name}.json").write_text(json.dumps(metrics, indent=1) + "\n")
    shutil.copyfile(out / "table.md", res / f"{a.name}.md")
    shutil.copyfile(out / "curves.png", res / f"{a.name}.png")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
