"""Generalist learned optimizer: meta-train on a task distribution, evaluate on held-out tasks.

    python benchmarks/lopt_generalist.py train --out runs/lopt_generalist --iterations 400 --max-steps 50
    python benchmarks/lopt_generalist.py eval --checkpoint runs/lopt_generalist/lopt_generalist.pt \\
        --out runs/lopt_generalist_eval
    python benchmarks/lopt_generalist.py report --out runs/lopt_generalist_eval
    python benchmarks/lopt_generalist.py compare --out runs/eval_a runs/eval_b --labels A B --name NAME
    python benchmarks/lopt_generalist.py steptime --out unused --checkpoint A.pt B.pt --labels A B

``train`` resumes from the run folder (run it again for the next slice); ``eval`` skips tasks
already in ``heldout.json``; ``report`` writes ``benchmarks/results/<--name>.{md,json,png}`` (default ``lopt_generalist``);
``compare`` summarises several ``eval`` folders (e.g. of candidates on the meta-training tasks,
``--tasks digits_mlp32_relu ...``) in one table, ``benchmarks/results/<--name>.{md,json}``; ``steptime`` times a ``LearnedOptimizer`` step of each
``--checkpoint`` against Adam (:func:`~gradmeta.lopt.step_times`) on two MLPs, batch 128,
``benchmarks/results/lopt_generalist_step_times.md`` (``--allocator default``: glibc's default allocator instead of
``gradmeta.keep_freed_cpu_memory()``, ``..._step_times_default_allocator.md``).
Tasks and protocol: :mod:`gradmeta.experiments.lopt.generalist`.
"""
import argparse
import json
import math
import platform
from pathlib import Path

import torch

from _common import add_allocator_option, set_allocator
from gradmeta.experiments.lopt import generalist as G


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["train", "eval", "report", "compare", "steptime"])
    ap.add_argument("--out", required=True, nargs="+", help="the run folder (compare: several eval folders)")
    ap.add_argument("--labels", nargs="+", default=None, help="compare: one label per --out folder")
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="(always on: a run folder with a checkpoint is resumed)")
    ap.add_argument("--checkpoint", default=None, nargs="+", help="the checkpoint (steptime: several)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--tasks", nargs="+", default=None, help="task names (default: the suite's)")
    ap.add_argument("--suite", choices=["heldout", "validation", "train"], default="heldout",
                    help="eval: the task suite when --tasks is not given")
    ap.add_argument("--horizons", type=int, nargs="+", default=[50, 100, 150])
    ap.add_argument("--adaptive", action="store_true", help="GeneralistRule(adaptive=True): learned per-step step-size adaptation")
    ap.add_argument("--lr-free", action="store_true",
                    help="GeneralistRule(lr_free=True): base step size estimated during the run (Prodigy)")
    ap.add_argument("--lr", type=float, default=3e-3, help="the rule's initial base learning rate")
    ap.add_argument("--particles", type=int, default=16, help="ES particles per meta-iteration")
    ap.add_argument("--meta-lr", type=float, default=1e-2, help="Adam learning rate of the meta-parameters")
    ap.add_argument("--objective", choices=["train", "valid", "valid_min"], default="train",
                    help="meta-loss: mean log inner train loss, validation loss after each step, or the lowest of those")
    ap.add_argument("--name", default="lopt_generalist",
                    help="report: write benchmarks/results/<name>.{md,json,png} (default: the shipped checkpoint's)")
    ap.add_argument("--init", default=None, help='JSON starting values of meta-parameters, e.g. \'{"w_adapt": [10, 0]}\'')
    add_allocator_option(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    suffix = set_allocator(args.allocator)
    if args.command != "compare" and len(args.out) != 1:
        ap.error(f"{args.command} takes one --out folder")
    if args.command == "compare":
        _compare(args.out, args.labels or args.out, args.name)
        return
    if args.command == "steptime":
        _step_times(args.checkpoint or ["generalist"], args.labels or args.checkpoint or ["generalist"], suffix)
        return
    args.out = args.out[0]
    if args.command == "train":
        G.meta_train(args.out, iterations=args.iterations, max_steps=args.max_steps,
                     tasks=tuple(args.tasks or (G.TRAIN_TASKS if args.adaptive or args.lr_free else G.TRAIN_TASKS_V1)),
                     horizons=tuple(args.horizons), adaptive=args.adaptive, lr=args.lr, objective=args.objective,
                     init=json.loads(args.init) if args.init else None, lr_free=args.lr_free,
                     particles=args.particles, meta_lr=args.meta_lr)
    elif args.command == "eval":
        G.evaluate_suite(args.checkpoint[0] if args.checkpoint else None, args.out, steps=args.steps, seeds=tuple(args.seeds),
                         tasks=tuple(args.tasks or {"heldout": G.HELDOUT_TASKS, "validation": G.VALIDATION_TASKS,
                                                    "train": G.TRAIN_TASKS}[args.suite]))
    else:
        results = json.loads((Path(args.out) / "heldout.json").read_text())
        table, targets = G.summarise(results)
        env = f"torch {torch.__version__}, Python {platform.python_version()}, CPU, 1 thread"
        md = f"{table}\n\nTargets: {json.dumps(targets)}\n\n{env}\n"
        res = Path("benchmarks/results")
        res.mkdir(parents=True, exist_ok=True)
        (res / f"{args.name}.md").write_text(md)
        (res / f"{args.name}.json").write_text(json.dumps({"targets": targets, "results": results, "env": env}, indent=1))
        _plot(results, res / f"{args.name}.png")
        print(md)


def _compare(outs: list[str], labels: list[str], name: str) -> None:
    """One row per eval folder: wins against tuned Adam, geometric mean of best / tuned Adam's best,
    worst final / best, median step reduction (:func:`~gradmeta.experiments.lopt.generalist.summarise`)."""
    if len(labels) != len(outs):
        raise SystemExit(f"compare: {len(outs)} --out folders but {len(labels)} --labels")
    rows = ["| candidate | best ≤ tuned Adam | geometric mean of best / tuned Adam's best | worst final / best "
            "| median step reduction |", "|---|---|---|---|---|"]
    summary = {}
    for out, label in zip(outs, labels):
        results = json.loads((Path(out) / "heldout.json").read_text())
        _, t = G.summarise(results)
        ratio = math.exp(sum(math.log(sum(r["best"]) / sum(r["adam_best"])) for r in results.values()) / len(results))
        summary[label] = {**t, "geo_mean_best_over_adam": ratio, "tasks_evaluated": list(results)}
        rows.append(f"| {label} | {t['wins']}/{t['tasks']} | {ratio:.3f} | {t['max_final_over_best']:.3g} "
                    f"| {t['median_step_reduction']:.2f} |")
    env = f"torch {torch.__version__}, Python {platform.python_version()}, CPU, 1 thread"
    md = "\n".join(rows) + f"\n\n{env}\n"
    res = Path("benchmarks/results")
    res.mkdir(parents=True, exist_ok=True)
    (res / f"{name}.md").write_text(md)
    (res / f"{name}.json").write_text(json.dumps({"candidates": summary, "env": env}, indent=1))
    print(md)


def _step_times(checkpoints: list[str], labels: list[str], suffix: str = "") -> None:
    """Median full-step time of ``LearnedOptimizer`` vs ``torch.optim.Adam`` (interleaved) per checkpoint."""
    import os

    from gradmeta.lopt import step_times
    from gradmeta.models import classification_loss, mlp

    if len(labels) != len(checkpoints):
        raise SystemExit(f"steptime: {len(checkpoints)} --checkpoint files but {len(labels)} --labels")
    rows = ["| MLP | checkpoint | learned step (ms) | Adam step (ms) | ratio |", "|---|---|---|---|---|"]
    for sizes in ([64, 32, 10], [784, 256, 256, 10]):
        torch.manual_seed(0)
        model = mlp(sizes)
        batch = (torch.randn(128, sizes[0]), torch.randint(0, sizes[-1], (128,)))
        for ck, label in zip(checkpoints, labels):
            r = step_times(model, classification_loss, batch, checkpoint=ck, repeats=100)
            rows.append(f"| {'-'.join(map(str, sizes))} | {label} | {r['lopt_ms']:.3g} | {r['adam_ms']:.3g} "
                        f"| {r['ratio']:.2f}× |")
            print(rows[-1], flush=True)
    allocator = "freed memory kept for reuse" if not suffix else "glibc's default allocator"
    env = (f"torch {torch.__version__}, Python {platform.python_version()}, CPU, 1 thread, batch 128, {allocator}, "
           f"load average {os.getloadavg()[0]:.2f} at the end")
    md = "\n".join(rows) + f"\n\n{env}\n"
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path(f"benchmarks/results/lopt_generalist_step_times{suffix}.md").write_text(md)
    print(md)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (name, r) in zip(axes.flat, results.items()):
        ax.plot(r["eval_steps"], r["curve"], label="generalist (learned)")
        ax.plot(r["eval_steps"], r["adam_curve"], label=f"Adam, tuned lr {r['adam_lr']:g}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("inner step")
        ax.set_ylabel("test loss (mean of seeds)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("Generalist learned optimizer vs lr-tuned Adam on held-out tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
