"""Task ``lopt_table``: the step-reduction table of several meta-trained learned optimizers.

Reads ``lopt_meta_train`` run folders ``<runs_root>/<row>_s<seed>`` (one per row of ``rows`` and
meta-training seed of ``meta_seeds``; a folder that is missing or not complete is listed under
``missing`` and left out of its row), then trains on the same held-out initialisation ``seeds``
and the same batches:

* Adam tuned over ``adam_lrs`` (best mean test loss over the seeds): the reference;
* SGD with momentum tuned over ``sgdm_lrs`` × ``sgdm_momenta``;
* every learned optimizer, with its run's meta-parameters.

Step reduction (per evaluation seed) = steps tuned Adam needs to reach its best test loss ÷ steps
the optimizer needs to reach that loss (0 when it never does), with test losses every
``eval_every`` steps. A learned row's figure is the mean over its meta-training seeds of the mean
over evaluation seeds, ± the std over meta-training seeds (Adam, SGDM: ± the std over evaluation
seeds). Each "<X> + GradMetaNet" row's ratio to row "<X>" (against the target) and each other
"<X> + ..." row's (no target) comes with a 95 % percentile-bootstrap interval over meta-training
seeds (:func:`ratio_interval`), and so does each pair of rows named by ``compare`` and ``compare_with``
(no target). Writes ``table.md`` (markdown) and
``curves.png`` (mean test-loss curves) besides ``metrics.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gradmeta._io import atomic_write
from gradmeta.lopt import adam, learned_curves, sgdm, step_reduction, train_curves
from gradmeta.specs import Range, register_task

from .tasks import _POS, PROTOCOL_DEFAULTS, _from_run, _nonempty, _task

if TYPE_CHECKING:
    from gradmeta.run import Run

__all__ = ["lopt_table", "TABLE_DEFAULTS", "GMN_SUFFIX", "ratio_interval"]

#: A row labelled ``"<X> + GradMetaNet"`` (or ``"<X> + GradMetaNet++ ..."``) is compared with the row labelled ``"<X>"``.
GMN_SUFFIX = " + GradMetaNet"

TABLE_DEFAULTS = {
    **PROTOCOL_DEFAULTS,
    "runs_root": "runs",
    "rows": [""],  # run-folder stems, e.g. "lopt_fmnist" for runs_root/lopt_fmnist_s0 ...
    "labels": [""],  # one per row, e.g. "DS"; "<X> + GradMetaNet" rows are compared with "<X>"
    "meta_seeds": [Range(0, low=0), 1, 2],
    "steps": Range(1000, low=1),
    "eval_every": Range(25, low=1),
    "sgdm_momenta": [Range(0.9, low=0, high=1, high_open=True)],
    "targets": {"gmn_ratio": Range(1.2, **_POS), "best": Range(1.6, **_POS)},
    # more ratios to report, without a target: row compare[i] ÷ row compare_with[i] (labels)
    "compare": [""],
    "compare_with": [""],
}


def _best(test: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(test, nan=float("inf")).min(-1).values


def _stats(per_meta: list[torch.Tensor]) -> dict:
    """``{mean, std}`` over meta-training seeds of the means over evaluation seeds; ``per_meta``: a
    list of ``(S,)``. With one entry (a hand-designed optimizer) the std is over evaluation seeds."""
    means = torch.stack([x.mean() for x in per_meta])
    spread = means if len(means) > 1 else per_meta[0]
    return {"mean": float(means.mean()), "std": float(spread.std()) if len(spread) > 1 else 0.0,
            "std_over": "meta-training seeds" if len(means) > 1 else "evaluation seeds",
            "per_meta_seed": means.tolist()}


def _row(name: str, tests: list[torch.Tensor], ref: torch.Tensor, steps_t: torch.Tensor, meta_seeds: list) -> dict:
    red = [step_reduction(ref, t, steps_t) for t in tests]
    return {"label": name, "meta_seeds": meta_seeds, "step_reduction": _stats(red),
            "best_test_loss": _stats([_best(t) for t in tests]), "final_test_loss": _stats([t[:, -1] for t in tests]),
            "per_seed_step_reduction": [r.tolist() for r in red]}


def ratio_interval(base: list[float], other: list[float], paired: bool, level: float = 0.95,
                   resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``mean(other) / mean(base)`` over meta-training seeds.

    ``base``, ``other``: one figure per meta-training seed (a row's per-seed step reductions).
    Each of ``resamples`` draws (a fixed generator seeded with ``seed``, so the interval is
    reproducible) resamples the seeds with replacement: jointly when ``paired`` (both lists belong to
    the same seeds, in the same order), else each list on its own. Returns the ``(1 − level)/2`` and
    ``(1 + level)/2`` quantiles of the resampled ratios, each an actual resampled value (no
    interpolation). A draw whose base mean is 0 gives ``inf`` (``other`` > 0) or counts as 0 (both 0:
    no gain is credited, as for the table's point ratio).

    Raises:
        ValueError: if a list is empty, or ``paired`` and the lengths differ.
    """
    b, g = torch.tensor(base, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    if not len(b) or not len(g):
        raise ValueError(f"ratio_interval needs one figure per meta-training seed in both rows, got {len(b)} and {len(g)}")
    if paired and len(b) != len(g):
        raise ValueError(f"ratio_interval(paired=True): both rows need the same seeds, got {len(b)} and {len(g)} figures")
    gen = torch.Generator().manual_seed(seed)
    ib = torch.randint(len(b), (resamples, len(b)), generator=gen)
    ig = ib if paired else torch.randint(len(g), (resamples, len(g)), generator=gen)
    ratios = torch.nan_to_num(g[ig].mean(-1) / b[ib].mean(-1), nan=0.0, posinf=float("inf"))
    lo = torch.quantile(ratios, (1 - level) / 2, interpolation="lower")
    hi = torch.quantile(ratios, (1 + level) / 2, interpolation="higher")
    return float(lo), float(hi)


def _ratio(rows_by: dict, label: str, base: str) -> dict:
    """Row ``label``'s step reduction ÷ row ``base``'s, with a bootstrap interval (paired when both
    rows have the same seeds) when both have per-seed figures for ≥ 2 meta-training seeds."""
    v, b = (rows_by[k]["step_reduction"]["mean"] for k in (label, base))
    # both rows at 0 (neither reaches tuned Adam's best loss): no ratio
    entry = {"ratio": v / b if b > 0 else (float("inf") if v > 0 else float("nan"))}
    pb, pg = (rows_by[k]["step_reduction"].get("per_meta_seed") for k in (base, label))
    if pb and pg and len(pb) > 1 and len(pg) > 1:
        entry["paired"] = rows_by[base]["meta_seeds"] == rows_by[label]["meta_seeds"]
        entry["interval_95"] = ratio_interval(pb, pg, entry["paired"])
    return entry


def _targets(rows: list[dict], gmn_ratio: float, best: float, compare: list[tuple[str, str]] = ()) -> dict:
    """The GradMetaNet-vs-base ratios (with a bootstrap interval when both rows have per-seed figures
    for ≥ 2 meta-training seeds), the ratios of the ``compare`` pairs ``(label, base label)`` (rows
    missing from the table are left out) and the best row against the targets."""
    by = {r["label"]: r["step_reduction"]["mean"] for r in rows if r["meta_seeds"]}
    rows_by = {r["label"]: r for r in rows if r["meta_seeds"]}
    out = {"gmn_vs_base": {}, "vs_base": {}}
    for label in by:
        # "<X> + GradMetaNet", "<X> + GradMetaNet++ (...)": compared with row "<X>", against the
        # target; any other "<X> + ..." row too, without a target
        gmn = GMN_SUFFIX in label
        base = label.split(GMN_SUFFIX if gmn else " + ")[0] if " + " in label else None
        if base in by:
            entry = _ratio(rows_by, label, base)
            if gmn:
                out["gmn_vs_base"][label] = {**entry, "target": gmn_ratio, "met": bool(entry["ratio"] >= gmn_ratio)}
            else:
                out["vs_base"][label] = {**entry, "base": base}
    out["compared"] = [{"label": a, "base": b, **_ratio(rows_by, a, b)} for a, b in compare if a in by and b in by]
    learned = {k: v for k, v in by.items() if k not in ("Adam (tuned)",)}
    if learned:
        top = max(learned, key=learned.get)
        out["best_row"] = {"label": top, "step_reduction": learned[top], "target": best, "met": learned[top] >= best}
    return out


def _markdown(rows: list[dict], summary: dict) -> str:
    lines = ["| optimizer | step reduction vs tuned Adam | best test loss | final test loss | meta-training seeds |",
             "|---|---|---|---|---|"]
    for r in rows:
        if not r["meta_seeds"] and r["label"] not in ("Adam (tuned)", "SGDM (tuned)"):
            lines.append(f"| {r['label']} | not run | | | none |")
            continue
        f = lambda k: f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}"  # noqa: E731
        lines.append(f"| {r['label']} | {r['step_reduction']['mean']:.2f} ± {r['step_reduction']['std']:.2f} | "
                     f"{f('best_test_loss')} | {f('final_test_loss')} | "
                     f"{', '.join(map(str, r['meta_seeds'])) if r['meta_seeds'] else '—'} |")
    t = summary["targets"]
    lines.append("")
    pairs = [(k, label, g) for k in ("gmn_vs_base", "vs_base") for label, g in t.get(k, {}).items()]
    for kind, label, g in pairs + [("compared", g["label"], g) for g in t.get("compared", [])]:
        ratio = f"{g['ratio']:.2f}×" if g["ratio"] == g["ratio"] else "undefined (both step reductions 0)"
        if "interval_95" in g:
            lo, hi = g["interval_95"]
            ratio += (f", 95 % bootstrap interval over meta-training seeds{' (paired)' if g['paired'] else ''} "
                      f"{lo:.2f}–{hi:.2f}")
        if kind == "gmn_vs_base":
            lines.append(f"- {label} vs without GradMetaNet: {ratio} (target ≥ {g['target']}×: "
                         f"{'met' if g['met'] else 'not met'})")
        else:
            lines.append(f"- {label} vs {g['base']}: {ratio}")
    if "best_row" in t:
        b = t["best_row"]
        lines.append(f"- best row {b['label']}: {b['step_reduction']:.2f} (target ≥ {b['target']}: "
                     f"{'met' if b['met'] else 'not met'})")
    return "\n".join(lines) + "\n"


@register_task("lopt_table", defaults=TABLE_DEFAULTS)
def lopt_table(run: Run) -> dict:
    """Evaluate the learned optimizers of ``rows`` × ``meta_seeds`` against tuned Adam and SGDM."""
    s = run.spec
    _nonempty(run, "seeds", "adam_lrs", "sgdm_lrs", "sgdm_momenta")
    rows, labels = [r for r in s["rows"] if r], [lab for lab in s["labels"] if lab]
    if len(rows) != len(labels):
        raise run.spec_error("labels", f"one label per row: {len(rows)} rows, {len(labels)} labels")
    compare = [(a, b) for a, b in zip(s["compare"], s["compare_with"]) if a or b]
    if len(s["compare"]) != len(s["compare_with"]):
        raise run.spec_error("compare_with", f"one base label per compared row: {len(s['compare'])} in compare, "
                             f"{len(s['compare_with'])} in compare_with")
    unknown = sorted({x for pair in compare for x in pair} - set(labels))
    if unknown:
        raise run.spec_error("compare", f"names no row label: {', '.join(map(repr, unknown))} (labels: "
                             f"{', '.join(map(repr, labels))})")
    task = _task(run)
    seeds, steps, every, ds = s["seeds"], s["steps"], s["eval_every"], s["data_seed"]
    folders = {(r, m): Path(s["runs_root"]) / f"{r}_s{m}" for r in rows for m in s["meta_seeds"]}
    done = {k: f for k, f in folders.items() if _complete(f)}
    bar = run.progress(2 + len(done), desc="lopt_table")
    a = train_curves(task, adam, torch.tensor(s["adam_lrs"]), seeds, steps, every, ds)
    j = int(_best(a["test_loss"]).mean(-1).argmin())
    ref, steps_t = a["test_loss"][j], a["eval_steps"]
    bar.update(1)
    sg = [train_curves(task, lambda lr, mu=mu: sgdm(lr, mu), torch.tensor(s["sgdm_lrs"]), seeds, steps, every, ds)
          for mu in s["sgdm_momenta"]]
    sg_all = torch.cat([c["test_loss"] for c in sg])  # (M·L, S, E), momentum-major
    k = int(_best(sg_all).mean(-1).argmin())
    sgdm_lr, sgdm_mu = s["sgdm_lrs"][k % len(s["sgdm_lrs"])], s["sgdm_momenta"][k // len(s["sgdm_lrs"])]
    bar.update(1)
    out_rows = [_row("Adam (tuned)", [ref], ref, steps_t, []), _row("SGDM (tuned)", [sg_all[k]], ref, steps_t, [])]
    curves = {f"Adam lr={s['adam_lrs'][j]:g} (tuned)": ref, f"SGDM lr={sgdm_lr:g} μ={sgdm_mu:g} (tuned)": sg_all[k]}
    for r, label in zip(rows, labels):
        tests, metas = [], []
        for m in s["meta_seeds"]:
            if (r, m) not in done:
                continue
            lo, meta = _from_run(str(done[(r, m)]), task)
            tests.append(learned_curves(task, lo, meta, seeds, steps, every, ds)["test_loss"][0])
            metas.append(m)
            bar.update(1)
        out_rows.append(_row(label, tests, ref, steps_t, metas) if tests else
                        {"label": label, "meta_seeds": [], "run_stem": r})
        out_rows[-1]["run_stem"] = r
        if tests:
            curves[f"{label} ({len(tests)} meta-seeds)"] = torch.cat(tests)
    bar.close()
    summary = {"adam_lr": s["adam_lrs"][j], "sgdm_lr": sgdm_lr, "sgdm_momentum": sgdm_mu, "seeds": list(seeds),
               "steps": steps, "eval_every": every, "task": task.name,
               "missing": sorted(str(f) for k, f in folders.items() if k not in done)}
    summary["targets"] = _targets([r for r in out_rows if "step_reduction" in r], **s["targets"], compare=compare)
    summary["rows"] = {r["label"]: {k: r[k] for k in ("step_reduction", "best_test_loss", "final_test_loss", "meta_seeds")}
                       for r in out_rows if "step_reduction" in r}
    md = _markdown([r if "step_reduction" in r else {**r, "meta_seeds": []} for r in out_rows], summary)
    if run.writer:
        atomic_write(run.out / "table.md", lambda f: f.write(md), mode="w")
    from .plots import plot_curves

    plots = [run.save_figure(plot_curves({k: (steps_t, v) for k, v in curves.items()},
                                         f"{task.name}: test loss, mean ± std over seeds"), "curves.png")]
    history = {"curves": {"step": steps_t.tolist(), **{k: v.mean(0).tolist() for k, v in curves.items()}},
               "rows": out_rows}
    return {"step": steps, "total_steps": steps, "summary": summary, "history": history, "plots": plots,
            "table_markdown": md}


def _complete(folder: Path) -> bool:
    """A ``lopt_meta_train`` run folder whose ``metrics.json`` says ``complete``."""
    import json

    try:
        return json.loads((folder / "metrics.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False
