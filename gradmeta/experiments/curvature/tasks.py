"""Tasks ``curvature_learned`` (Fisher diagonal, SIRENs) and ``curvature_learned_trace`` (Fisher
trace, MLPs on digits): learned curvature estimators vs the standard estimator.

``gradmeta run tasks/curvature_learned_fisher.toml`` draws a pool of random SIRENs 1-h-h-1
(``data.seed``) and a held-out test set (``data.seed + 1``), then for every model in ``models``,
every training-set size in ``train_sizes`` and every seed trains a
:class:`~gradmeta.curvature.LearnedFisherEstimator` on a random subset of the pool (the seed picks
the subset, the initialisation and the minibatches) and records its error on the test set relative
to the standard estimator. One checkpoint per finished job, so ``--resume`` continues where it
stopped. Writes ``curvature_learned.png`` (error ratio vs training-set size) and ``table.md``.

``gradmeta run tasks/curvature_learned_trace.toml`` draws, for every hidden width in ``widths``, a
training zoo of ``train_size`` MLPs 64-h-h-10 (``data.seed``) and a held-out zoo (``data.seed + 1``)
with :func:`~gradmeta.curvature.make_trace_dataset`, then trains a
:class:`~gradmeta.curvature.LearnedTraceEstimator` per model, width and seed (the seed picks the
initialisation and the minibatches) and records its normalised MAE on the held-out zoo next to the
standard estimator's. Resumable per job; writes ``curvature_learned_trace.png``, ``table.md`` and
``results.json`` (spec, environment, summary, every job).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import json
import math
import time

import torch

from gradmeta._io import safe_torch_load
from gradmeta._runtime import environment, torch_threads
from gradmeta.specs import NonEmpty, Range, register_task
from .learned_fisher import (LEARNED_MODELS, LearnedFisherEstimator, evaluate_fisher_estimator, make_fisher_dataset,
                       train_fisher_estimator)
from .learned_trace import (TRACE_MODELS, LearnedTraceEstimator, evaluate_trace_estimator, make_trace_dataset,
                             train_trace_estimator)

if TYPE_CHECKING:  # the runner passes a Run; experiments never import the runner
    from gradmeta.run import Run

__all__ = ["curvature_learned", "DEFAULTS", "results_table", "merge_runs",
           "curvature_learned_trace", "TRACE_DEFAULTS", "trace_table"]

DEFAULTS = {
    "seeds": NonEmpty([Range(0, low=0), 1]),
    "train_sizes": [Range(32, low=1), 128],
    "models": list(LEARNED_MODELS),
    "data": {"set_size": Range(128, low=1), "num_points": Range(1024, low=1), "hidden": 32,
             "test_size": Range(128, low=1), "seed": Range(0, low=0)},
    "model": {"channels": 16, "layers": 2},
    "train": {"steps": Range(100, low=1), "batch_size": Range(8, low=1), "lr": Range(3e-3, low=0, low_open=True)},
    # GradMetaNet++ costs ~10x a GradMetaNet step on CPU; its own step count (0: train.steps)
    "plusplus_steps": Range(20, low=0),
}


def _check_jobs(run: Run, known, sizes_key: str, sizes_msg: str) -> None:
    """Spec errors for unknown ``models`` or a missing / non-positive ``sizes_key`` list."""
    for m in run.spec["models"]:
        if m not in known:
            raise run.spec_error("models", f"unknown model {m!r}; use {list(known)}")
    if not run.spec[sizes_key] or min(run.spec[sizes_key]) < 1:
        raise run.spec_error(sizes_key, sizes_msg)


def _run_jobs(run: Run, jobs: dict, job, train, evaluate, desc: str) -> dict:
    """Train and evaluate one estimator per pending job; one checkpoint per finished job.

    ``jobs``: ``{key: (kind, size, seed)}``; ``job(kind, size, seed) -> (estimator, train data,
    test data)`` (it seeds the initialisation); ``train(est, data, steps=, batch_size=, lr=, seed=,
    log_every=)`` and ``evaluate(est, data) -> dict`` are the study's functions. GradMetaNet++ trains
    ``plusplus_steps`` steps when that is set. Returns ``{"results": {key: ...}, "losses": {key: [...]}}``
    (``train_seconds`` includes the evaluation).
    """
    spec, t = run.spec, run.spec["train"]
    state = run.restore() or {"results": {}, "losses": {}}
    for key in run.pending(list(jobs), state["results"], desc=desc):
        kind, size, seed = jobs[key]
        est, train_data, test_data = job(kind, size, seed)
        steps = spec["plusplus_steps"] if kind == "gradmetanet++" and spec["plusplus_steps"] else t["steps"]
        t1 = time.perf_counter()
        hist = train(est, train_data, steps=steps, batch_size=t["batch_size"], lr=t["lr"], seed=seed,
                     log_every=max(1, steps // 50))
        state["results"][key] = {**evaluate(est, test_data), "train_seconds": time.perf_counter() - t1, "steps": steps}
        state["losses"][key] = hist["loss"]
        run.checkpoint(state, len(state["results"]))
    return state


@register_task("curvature_learned", defaults=DEFAULTS)
def curvature_learned(run: Run) -> dict:
    """Learned Fisher diagonal of random SIRENs from 128 output gradients: error vs the standard estimator."""
    spec = run.spec
    _check_jobs(run, LEARNED_MODELS, "train_sizes", "need one or more positive sizes")
    d = spec["data"]
    kw = {"set_size": d["set_size"], "num_points": d["num_points"], "hidden": d["hidden"]}
    t0 = time.perf_counter()
    pool = make_fisher_dataset(max(spec["train_sizes"]), seed=d["seed"], **kw)
    test = make_fisher_dataset(d["test_size"], seed=d["seed"] + 1, **kw)
    data_seconds = time.perf_counter() - t0
    jobs = {f"{m}/n{n}/seed{s}": (m, n, s) for m in spec["models"] for n in spec["train_sizes"] for s in spec["seeds"]}

    def job(kind, n, seed):  # a random subset of n SIRENs of the pool (seed), the held-out test set
        train = pool.subset(torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n])
        torch.manual_seed(seed)
        return LearnedFisherEstimator(kind, d["hidden"], spec["model"]["channels"], spec["model"]["layers"]), train, test

    state = _run_jobs(run, jobs, job, train_fisher_estimator, evaluate_fisher_estimator, "estimators")
    std_err = evaluate_fisher_estimator(None, test)["standard_error"]
    summary = _summary(state, spec, std_err)
    summary["reduction/quadrature"] = evaluate_fisher_estimator("quadrature", test)["reduction"]
    summary["data_seconds"] = data_seconds
    plots = [_plot(run, spec, state, summary["reduction/quadrature"])] if state["results"] else []
    (run.out / "table.md").write_text(results_table(summary, spec) + "\n")
    return {"summary": summary, "history": {"train_loss": state["losses"]}, "plots": plots,
            "step": len(state["results"]), "total_steps": len(jobs)}


def _stats(vals: list[float]) -> tuple[float, float]:
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def _summary(state: dict, spec: dict, std_err: float) -> dict:
    out = {"standard_error": std_err, "test_size": spec["data"]["test_size"]}
    best = (-math.inf, "")
    for m in spec["models"]:
        for n in spec["train_sizes"]:
            rs = [r for k, r in state["results"].items() if k.startswith(f"{m}/n{n}/")]
            if not rs:
                continue
            mean, std = _stats([r["reduction"] for r in rs])
            out[f"reduction/{m}/n{n}"], out[f"reduction_std/{m}/n{n}"] = mean, std
            out[f"error/{m}/n{n}"] = _stats([r["error"] for r in rs])[0]
            out[f"seeds/{m}/n{n}"] = len(rs)
            out[f"steps/{m}"] = rs[0]["steps"]
            out[f"train_seconds/{m}/n{n}"] = _stats([r["train_seconds"] for r in rs])[0]
            best = max(best, (mean, f"{m}/n{n}"))
    if best[1]:
        out["best_reduction"], out["best"] = best
    return out


def results_table(summary: dict, spec: dict) -> str:
    """Markdown table: error reduction vs the standard estimator (mean ± std over seeds) per model and size."""
    sizes = spec["train_sizes"]
    lines = ["| model | steps | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---|---|" + "---|" * len(sizes)]
    for m in spec["models"]:
        cells = []
        for n in sizes:
            k = f"{m}/n{n}"
            if f"reduction/{k}" in summary:
                cells.append(f"{100 * summary[f'reduction/{k}']:+.1f}% ± {100 * summary[f'reduction_std/{k}']:.1f} "
                             f"({summary[f'seeds/{k}']} seeds)")
            else:
                cells.append("—")
        lines.append(f"| {m} | {summary.get(f'steps/{m}', '—')} | " + " | ".join(cells) + " |")
    if "reduction/quadrature" in summary:
        q = f"{100 * summary['reduction/quadrature']:+.1f}% (not learned)"
        lines.append("| quadrature reference | — | " + " | ".join([q] * len(sizes)) + " |")
    lines.append("\nError reduction = 1 − error(model) / error(standard estimator) on "
                 f"{summary['test_size']} held-out "
                 f"SIRENs; standard-estimator error {summary['standard_error']:.4g} (mean over parameter tensors of "
                 "‖F̂−F‖²/‖F‖²). Positive = better than the standard estimator.")
    return "\n".join(lines)


def merge_runs(folders: list, spec_path, out_prefix) -> dict:
    """Union the finished jobs of several run folders of the same spec split by ``models`` (jobs
    are independent and seeded, so this equals one run) and write ``<out_prefix>.json|.md|.png``."""
    import json
    from pathlib import Path

    from gradmeta.specs import load_spec, resolve_spec

    spec = resolve_spec(load_spec(spec_path), spec_path)
    results, quad, std = {}, None, None
    for f in folders:
        state = safe_torch_load(Path(f) / "checkpoint.pt", "run checkpoint")["state"]
        results.update(state["results"])
        m = json.loads((Path(f) / "metrics.json").read_text())["summary"]
        quad, std = m["reduction/quadrature"], m["standard_error"]
    state = {"results": results}
    summary = {**_summary(state, spec, std), "reduction/quadrature": quad}
    out = Path(out_prefix)
    out.with_suffix(".json").write_text(json.dumps({"spec": spec, "summary": summary, "results": results},
                                                   indent=1) + "\n")
    out.with_suffix(".md").write_text(results_table(summary, spec) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = _figure(spec, state, quad)
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)
    return summary


def _plot(run: Run, spec: dict, state: dict, quadrature: float | None = None) -> str:
    return run.save_figure(_figure(spec, state, quadrature), "curvature_learned.png")


def _figure(spec: dict, state: dict, quadrature: float | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in spec["models"]:
        xs, ys, es = [], [], []
        for n in spec["train_sizes"]:
            rs = [r["error"] / r["standard_error"] for k, r in state["results"].items() if k.startswith(f"{m}/n{n}/")]
            if rs:
                mean, std = _stats(rs)
                xs.append(n), ys.append(mean), es.append(std)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="standard estimator")
    if quadrature is not None:
        ax.axhline(1 - quadrature, color="tab:olive", lw=0.8, ls="-.", label="quadrature reference")
    ax.axhline(0.7, color="gray", lw=0.8, ls=":", label="target (−30%)")
    ax.set_xscale("log")
    ax.set_xlabel("training SIRENs")
    ax.set_ylabel("error / standard-estimator error")
    ax.set_title("Fisher diagonal from 128 output gradients")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- trace
TRACE_DEFAULTS = {
    "seeds": NonEmpty([Range(0, low=0), 1]),
    "widths": [32],
    "train_size": Range(32, low=1),
    "models": [m for m in TRACE_MODELS if m != "gradmetanet++"],
    "threads": Range(1, low=1),
    "data": {"set_size": Range(128, low=1), "num_points": Range(0, low=0), "test_size": Range(32, low=1),
             "seed": Range(0, low=0), "init_scale": [0.5, 2.0], "train_steps": Range(50, low=0),
             "lr": Range(1e-2, low=0, low_open=True)},
    "model": {"channels": 16, "layers": 2},
    "train": {"steps": Range(100, low=1), "batch_size": Range(8, low=1), "lr": Range(3e-3, low=0, low_open=True)},
    "plusplus_steps": Range(20, low=0),  # GradMetaNet++ costs ~30x a GradMetaNet step here (0: train.steps)
}


@register_task("curvature_learned_trace", defaults=TRACE_DEFAULTS)
def curvature_learned_trace(run: Run) -> dict:
    """Learned Fisher trace of MLPs 64-h-h-10 on digits from 128 gradients: normalised MAE vs the standard estimator."""
    spec = run.spec
    _check_jobs(run, TRACE_MODELS, "widths", "need one or more positive hidden widths")
    d = spec["data"]
    if len(d["init_scale"]) != 2:
        raise run.spec_error("data.init_scale", f"need [low, high], got {d['init_scale']}")
    kw = {"set_size": d["set_size"], "num_points": d["num_points"] or None, "init_scale": tuple(d["init_scale"]),
          "train_steps": d["train_steps"], "lr": d["lr"]}
    with torch_threads(spec["threads"]):
        env, t0 = environment(), time.perf_counter()
        data = {h: (make_trace_dataset(spec["train_size"], hidden=h, seed=d["seed"], **kw),
                    make_trace_dataset(d["test_size"], hidden=h, seed=d["seed"] + 1, **kw)) for h in spec["widths"]}
        data_seconds = time.perf_counter() - t0
        jobs = {f"{m}/h{h}/seed{s}": (m, h, s) for m in spec["models"] for h in spec["widths"] for s in spec["seeds"]}

        def job(kind, h, seed):  # the training and held-out zoos of width h
            torch.manual_seed(seed)
            return LearnedTraceEstimator(kind, h, spec["model"]["channels"], spec["model"]["layers"]), *data[h]

        state = _run_jobs(run, jobs, job, train_trace_estimator, evaluate_trace_estimator, "trace estimators")
    summary = _trace_summary(state, spec, {h: test for h, (_, test) in data.items()})
    summary["data_seconds"] = data_seconds
    plots = [run.save_figure(_trace_figure(spec, summary), "curvature_learned_trace.png")] if state["results"] else []
    (run.out / "table.md").write_text(trace_table(summary, spec) + "\n")
    (run.out / "results.json").write_text(json.dumps({"spec": spec, "environment": env, "summary": summary,
                                                      "results": state["results"]}, indent=1) + "\n")
    return {"summary": summary, "history": {"train_loss": state["losses"]}, "plots": plots,
            "step": len(state["results"]), "total_steps": len(jobs)}


def _trace_summary(state: dict, spec: dict, tests: dict) -> dict:
    out: dict = {"test_size": spec["data"]["test_size"], "train_size": spec["train_size"]}
    for h, test in tests.items():
        out[f"standard_nmae/h{h}"] = evaluate_trace_estimator(None, test)["standard_nmae"]
        out[f"target_range/h{h}"] = [float(test.target.min()), float(test.target.max())]
        rb = evaluate_trace_estimator("rao_blackwell", test)
        out[f"nmae/rao_blackwell/h{h}"], out[f"ratio/rao_blackwell/h{h}"] = rb["nmae"], rb["ratio"]
        for m in spec["models"]:
            rs = [r for k, r in state["results"].items() if k.startswith(f"{m}/h{h}/")]
            if not rs:
                continue
            k = f"{m}/h{h}"
            out[f"nmae/{k}"], out[f"nmae_std/{k}"] = _stats([r["nmae"] for r in rs])
            out[f"ratio/{k}"], out[f"ratio_std/{k}"] = _stats([r["ratio"] for r in rs])
            out[f"seeds/{k}"], out[f"steps/{m}"] = len(rs), rs[0]["steps"]
            out[f"train_seconds/{k}"] = _stats([r["train_seconds"] for r in rs])[0]
    return out


def trace_table(summary: dict, spec: dict) -> str:
    """Markdown table: normalised MAE (mean ± std over seeds) and its ratio to the standard estimator's."""
    hs = spec["widths"]
    lines = ["| estimator | steps | " + " | ".join(f"h={h}: NMAE (÷ standard)" for h in hs) + " |",
             "|---|---|" + "---|" * len(hs),
             "| standard estimator | — | "
             + " | ".join(f"{summary[f'standard_nmae/h{h}']:.4f} (1)" for h in hs) + " |"]
    for m in spec["models"]:
        cells = []
        for h in hs:
            k = f"{m}/h{h}"
            cells.append(f"{summary[f'nmae/{k}']:.4f} ± {summary[f'nmae_std/{k}']:.4f} "
                         f"(×{summary[f'ratio/{k}']:.3f} ± {summary[f'ratio_std/{k}']:.3f}; "
                         f"{summary[f'seeds/{k}']} seeds)" if f"nmae/{k}" in summary else "—")
        lines.append(f"| {m} | {summary.get(f'steps/{m}', '—')} | " + " | ".join(cells) + " |")
    if all(f"nmae/rao_blackwell/h{h}" in summary for h in hs):
        rb = [f"{summary[f'nmae/rao_blackwell/h{h}']:.4f} (×{summary[f'ratio/rao_blackwell/h{h}']:.3f})" for h in hs]
        lines.append("| last-layer Rao–Blackwell reference (not learned) | — | " + " | ".join(rb) + " |")
    lines.append(f"\nNormalised MAE = mean over {summary['test_size']} held-out MLPs 64-h-h-10 of |T̂ − T| / T, "
                 "T the exact true-Fisher trace over the digits, "
                 f"T̂ from {spec['data']['set_size']} gradients with model-sampled labels; "
                 f"{summary['train_size']} training MLPs. (×r) = NMAE / standard-estimator NMAE; < 1 is better.")
    return "\n".join(lines)


def _trace_figure(spec: dict, summary: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    hs, ms = spec["widths"], [*spec["models"], "rao_blackwell"]
    w = 0.8 / len(ms)
    for i, m in enumerate(ms):
        xs = [j + (i - (len(ms) - 1) / 2) * w for j, h in enumerate(hs) if f"ratio/{m}/h{h}" in summary]
        ys = [summary[f"ratio/{m}/h{h}"] for h in hs if f"ratio/{m}/h{h}" in summary]
        es = [summary.get(f"ratio_std/{m}/h{h}", 0.0) for h in hs if f"ratio/{m}/h{h}" in summary]
        if xs:
            ax.bar(xs, ys, w, yerr=es, capsize=3, hatch="//" if m == "rao_blackwell" else None,
                   label="last-layer Rao–Blackwell (not learned)" if m == "rao_blackwell" else m)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="standard estimator")
    ax.set_xticks(range(len(hs)), [f"MLP 64-{h}-{h}-10" for h in hs])
    ax.set_ylabel("normalised MAE / standard estimator's")
    ax.set_title(f"Fisher trace from {spec['data']['set_size']} gradients (held-out MLPs)")
    ax.set_ylim(0, 1.6 * ax.get_ylim()[1])
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    fig.tight_layout()
    return fig
