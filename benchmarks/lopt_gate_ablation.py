"""Is it the branch? Every gated row of a learned-optimizer table re-evaluated with its gates closed.

A rule meta-trained with ``extra_gate = true`` (the branch's features enter its per-parameter MLP
through learned gates) is, with its gates set to zero, exactly the per-parameter MLP ("DS") with
the MLP part it learned (a tested identity). Evaluating both on the table's protocol separates what
the branch's features add from what the different meta-training trajectory gave the MLP part:

* ``open``: the rule as meta-trained (the table's figure);
* ``closed``: the same rule, gates at zero (branch read by nothing).

It reads the run folders of a ``lopt_table`` spec (after ``benchmarks/lopt_table.py`` ran them),
tunes Adam over the table's grid on the same held-out seeds, and writes
``benchmarks/results/<name>.{json,md}``.

    python benchmarks/lopt_gate_ablation.py --runs-root runs/lopt_fmnist_gated_240 --name lopt_fmnist_gate_ablation_240
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def closed_rule(lo, meta: dict):
    """``(PerParamMLP, meta)``: ``lo`` (a gated branch rule) with its gates closed, as the plain rule."""
    from gradmeta.lopt import PerParamMLP

    cfg = {k: v for k, v in lo.base.config().items() if k not in ("extra_features", "extra_gate")}
    plain = PerParamMLP(**cfg)
    return plain, {k[len("mlp."):]: v for k, v in meta.items()
                   if k.startswith("mlp.") and k not in ("mlp.w0_extra", "mlp.extra_gate")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", nargs="?", default=str(ROOT / "tasks" / "lopt_fmnist_table.toml"))
    p.add_argument("--runs-root", required=True)
    p.add_argument("--table-set", action="append", default=[], help="KEY=VALUE override for the table spec")
    p.add_argument("--meta-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--name", required=True)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from gradmeta.experiments.lopt.tasks import _from_run
    from gradmeta.lopt import adam, learned_curves, make_task, step_reduction, train_curves
    from gradmeta.specs import load_spec, resolve_spec

    torch.set_num_threads(1)
    table = Path(a.table)
    spec = resolve_spec(load_spec(table, a.table_set), table)
    t = spec["inner"]
    task = make_task(t["name"], hidden=t["hidden"], batch_size=t["batch_size"], data_root=t["data_root"] or None,
                     valid_fraction=t["valid_fraction"])
    seeds, steps, every, ds = spec["seeds"], spec["steps"], spec["eval_every"], spec["data_seed"]
    t0 = time.time()
    ad = train_curves(task, adam, torch.tensor(spec["adam_lrs"]), seeds, steps, every, ds)
    best = torch.nan_to_num(ad["test_loss"], nan=float("inf")).min(-1).values.mean(-1)
    j = int(best.argmin())
    ref, eval_steps = ad["test_loss"][j], ad["eval_steps"]
    rows = {}
    for stem, label in zip(spec["rows"], spec["labels"]):
        for m in a.meta_seeds:
            folder = Path(a.runs_root) / f"{stem}_s{m}"
            if not (folder / "checkpoint.pt").is_file():
                print(f"{folder}: no run, skipped", file=sys.stderr)
                continue
            lo, meta = _from_run(str(folder), task)
            if not getattr(getattr(lo, "base", None), "extra_gate", False):
                continue
            out = {"gates": [round(float(x), 4) for x in meta["mlp.extra_gate"]]}
            for which, (rule, mm) in (("open", (lo, meta)), ("closed", closed_rule(lo, meta))):
                test = learned_curves(task, rule, mm, seeds, steps, every, ds)["test_loss"][0]
                out[which] = {"step_reduction": float(step_reduction(ref, test, eval_steps).mean()),
                              "best_test_loss": float(torch.nan_to_num(test, nan=float("inf")).min(-1).values.mean()),
                              "final_test_loss": float(test[:, -1].mean())}
            rows.setdefault(label, {})[m] = out
            print(f"{label} seed {m}: open {out['open']['step_reduction']:.2f}, "
                  f"closed {out['closed']['step_reduction']:.2f}", flush=True)
    lines = ["| row | meta seed | step reduction, as trained | gates closed (its MLP part alone) | "
             "final test loss, as trained / closed | learned gates |", "|---|---|---|---|---|---|"]
    for label, per in rows.items():
        for m, o in per.items():
            lines.append(f"| {label} | {m} | {o['open']['step_reduction']:.2f} | {o['closed']['step_reduction']:.2f} | "
                         f"{o['open']['final_test_loss']:.3f} / {o['closed']['final_test_loss']:.3f} | "
                         f"{', '.join(f'{g:.3f}' for g in o['gates'])} |")
        mean = lambda w: sum(o[w]["step_reduction"] for o in per.values()) / len(per)  # noqa: E731
        lines.append(f"| **{label}, mean** | | **{mean('open'):.2f}** | **{mean('closed'):.2f}** | | |")
    md = "\n".join(lines) + "\n"
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    from gradmeta._runtime import environment

    (res / f"{a.name}.json").write_text(json.dumps(
        {"table": str(table.relative_to(ROOT)) if table.is_relative_to(ROOT) else str(table),
         "runs_root": a.runs_root, "adam_lr": spec["adam_lrs"][j], "seeds": seeds, "steps": steps,
         "eval_every": every, "rows": rows, "wall_s": time.time() - t0, "environment": environment()},
        indent=1) + "\n")
    (res / f"{a.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
