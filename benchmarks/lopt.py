"""Step time and state size of ``gradmeta.lopt.LearnedOptimizer`` side by side with ``torch.optim.Adam``.

For each model (the 2,410-parameter digits MLP 64-32-10 and an MLP 784-1024-1024-10, 1.86M
parameters; random inputs and labels, B = 128, cross-entropy) a full training step (forward,
backward, optimizer step) is timed for both optimizers, interleaved step by step so that machine
load affects both alike; medians over ``--repeats``. Also timed: the optimizer step alone. State
size is the bytes of the optimizer state over the bytes of the parameters. "Rule's MLP products
alone" times just the three matrix products of the learned rule on as many entries as the model has
parameters (interleaved too), and "floor: (fwd+bwd + MLP) vs Adam" is Adam's forward+backward plus
that time, over Adam's full step: no implementation of this rule can go below it on this device.
The "arithmetic floor" column is the lower bound of the learned step relative to a training step: the learned rule
runs an MLP ``F → h → h → 2`` on every parameter entry (``F·h + h² + 2h`` multiply-adds) while
forward and backward cost about ``3·B`` per parameter, so the ratio cannot go below
``1 + (F·h + h² + 2h) / (3·B)`` on a compute-bound device.

``--suite pes`` times one PES meta-training iteration (``PES.grad``: every particle unrolled
``truncation`` inner steps, vectorised with ``vmap``) of the GradMetaNet learned optimizers side by
side with the per-parameter one (same task, particles, truncation), as ratios. Each round runs one
iteration of every rule in turn; "vs per-parameter" is the ratio of the medians over rounds and
"paired" the median over rounds of (rule's time / per-parameter time of the same round), which is
less sensitive to load changing between rounds on a shared machine. The load average is recorded
at the start and at the end.

Usage::

    python benchmarks/lopt.py                      # both suites -> benchmarks/results/lopt_{step,pes}.{json,md}
    python benchmarks/lopt.py --suite pes          # the PES-iteration table only (--pes-repeats N: medians of N)
    python benchmarks/lopt.py --quick --out DIR    # small sizes (smoke test)
    python benchmarks/lopt.py --allocator default  # glibc's default allocator -> *_default_allocator.{json,md}

By default the process keeps freed CPU memory for reuse (``gradmeta.keep_freed_cpu_memory()``, as
the ``gradmeta`` command does); ``--allocator default`` measures glibc's default behaviour.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import add_allocator_option, environment, set_allocator, write_results
from gradmeta.lopt import PES, GradientStatsLO, GradMetaNetLO, LearnedOptimizer, PerParamMLP, WeightSpaceLO, digits_mlp
from gradmeta.models import classification_loss, mlp

HERE = Path(__file__).resolve().parent
TARGETS = {"digits": 1.5, "mlp1024": 2.0}
PES_TARGETS = {"base": 2.0, "plusplus": 5.0}
#: (label, kind, GradMetaNetLO / WeightSpaceLO arguments) of the PES suite
PES_RULES = [
    ("per-parameter MLP (PerParamMLP)", "per_param", {}),
    ("GradMetaNet, all {B} examples", "base", {}),
    ("GradMetaNet, 32 of {B} examples", "base", {"examples": 32}),
    ("GradMetaNet, 16 of {B} examples", "base", {"examples": 16}),
    ("GradMetaNet, 8 of {B} examples", "base", {"examples": 8}),
    ("GradMetaNet, 4 of {B} examples", "base", {"examples": 4}),
    ("GradMetaNet++, 32 of {B} examples", "plusplus", {"examples": 32}),
    ("GradMetaNet++, 16 of {B} examples", "plusplus", {"examples": 16}),
    ("GradMetaNet++, 16 of {B} examples, 2 blocks", "plusplus", {"examples": 16, "layers": 2}),
    ("GradMetaNet++, 8 of {B} examples", "plusplus", {"examples": 8}),
    ("GradMetaNet++, 8 of {B} examples, 2 blocks", "plusplus", {"examples": 8, "layers": 2}),
    ("GradMetaNet++, linear attention across neurons, 16 of {B} examples", "plusplus",
     {"examples": 16, "neuron_attention": "linear"}),
    ("GradMetaNet++, linear attention across neurons, 16 of {B} examples, 2 blocks", "plusplus",
     {"examples": 16, "layers": 2, "neuron_attention": "linear"}),
    ("GradMetaNet++, linear attention across neurons, 8 of {B} examples", "plusplus",
     {"examples": 8, "neuron_attention": "linear"}),
    ("weight-space (WeightSpaceLO)", "weightspace", {}),
    ("GradMetaNet, bilinear readout, 16 of {B} examples", "base", {"examples": 16, "product": "bilinear"}),
    ("gradient statistics (GradientStatsLO), 16 of {B} examples", "stats", {"examples": 16}),
]


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                key = (v.untyped_storage().data_ptr(), v.storage_offset(), v.numel())
                if key not in seen:
                    seen.add(key)
                    total += v.numel() * v.element_size()
    return total


def _mlp_only(opt: LearnedOptimizer, n: int):
    """The learned rule's three matrix products on ``n`` entries, chunked as in the fused update."""
    from gradmeta.lopt._fused import CHUNK_ROWS

    meta = opt._meta_for(torch.device("cpu"), torch.float32)
    F = opt.lo.n_base_features - 9
    x = torch.randn(F, n)
    w0t, w1t, w2t = meta["w0"][:F].T, meta["w1"].T, meta["w2"].T
    b0, b1, b2 = meta["b0"].unsqueeze(1), meta["b1"].unsqueeze(1), meta["b2"].unsqueeze(1)

    def run():
        for a in range(0, n, CHUNK_ROWS):
            h = torch.addmm(b0, w0t, x[:, a:a + CHUNK_ROWS]).relu_()
            h = torch.addmm(b1, w1t, h).relu_()
            torch.addmm(b2, w2t, h)
    return run


def run_case(name: str, widths: list[int], batch: int, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    models = {"adam": mlp(widths), "learned": mlp(widths)}
    models["learned"].load_state_dict(models["adam"].state_dict())
    opts = {"adam": torch.optim.Adam(models["adam"].parameters(), lr=1e-3),
            "learned": LearnedOptimizer(models["learned"].parameters(), checkpoint="digits")}
    x, y = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    full = {k: [] for k in opts}
    update = {k: [] for k in opts}
    n_params = sum(p.numel() for p in models["adam"].parameters())
    mlp_run, mlp_times = _mlp_only(opts["learned"], n_params), []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        mlp_run()
        if i >= warmup:
            mlp_times.append(time.perf_counter() - t0)
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            classification_loss(models[k](x), y).mean().backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i >= warmup:
                full[k].append(t2 - t0)
                update[k].append(t2 - t1)
    param_bytes = sum(p.numel() * p.element_size() for p in models["adam"].parameters())
    lo = opts["learned"].lo
    F = lo.n_base_features - 9  # features per entry entering the first layer (the step encoding is a bias)
    macs = F * lo.hidden + lo.hidden ** 2 + 2 * lo.hidden
    ms = {k: statistics.median(v) for k, v in full.items()}  # seconds
    ms_up = {k: statistics.median(v) for k, v in update.items()}
    rows = []
    for k, label in (("adam", "torch.optim.Adam"), ("learned", "LearnedOptimizer (shipped digits checkpoint)")):
        rows.append({"label": label, "step_s": ms[k], "update_s": ms_up[k], "ratio": ms[k] / ms["adam"],
                     "state_ratio": _state_bytes(opts[k]) / param_bytes,
                     "floor": 1 + macs / (3 * batch) if k == "learned" else 1.0,
                     "mlp_s": statistics.median(mlp_times) if k == "learned" else None,
                     "measured_floor": (ms["adam"] - ms_up["adam"] + statistics.median(mlp_times)) / ms["adam"]
                     if k == "learned" else None,
                     "target": TARGETS.get(name) if k == "learned" else None})
    desc = (f"MLP {'-'.join(map(str, widths))} (ReLU), {n_params:,} parameters, B={batch}, random data; "
            f"full step (forward, backward, update), median of {repeats} interleaved steps after {warmup} warm-up. "
            f"Learned rule: MLP {F}→{lo.hidden}→{lo.hidden}→2 per entry = {macs} multiply-adds per parameter "
            f"vs ≈ 3·B = {3 * batch} for forward+backward.")
    return {"name": name, "description": desc, "n_params": n_params, "results": rows}


def _pes_rule(task, kind: str, kwargs: dict):
    if kind == "per_param":
        return PerParamMLP()
    if kind == "weightspace":
        return WeightSpaceLO(task, **kwargs)
    if kind == "stats":
        return GradientStatsLO(task, **kwargs)
    return GradMetaNetLO(task, variant=kind, **kwargs)


def run_pes(hidden: int, batch: int, particles: int, truncation: int, repeats: int, warmup: int,
            only: list[str] | None = None) -> dict:
    """One PES iteration per rule, interleaved rule by rule; medians; ratios to the per-parameter rule
    (always the first; ``only``: the other rules whose label contains one of these strings)."""
    import os

    task = digits_mlp(hidden=[hidden], batch_size=batch)
    runs = []
    for i, (label, kind, kwargs) in enumerate(PES_RULES):
        if only and i and not any(o in label for o in only):
            continue
        lo = _pes_rule(task, kind, kwargs)
        meta = lo.init_meta(0)
        pes = PES(task, lo, particles=particles, truncation=truncation, horizon=10 ** 6)
        gen = torch.Generator().manual_seed(0)
        runs.append({"label": label.format(B=batch), "kind": kind, "pes": pes, "meta": meta, "gen": gen,
                     "state": pes.init(meta, gen), "times": []})
    for i in range(warmup + repeats):
        for r in runs:
            t0 = time.perf_counter()
            _, r["state"], _ = r["pes"].grad(r["meta"], r["state"], r["gen"])
            if i >= warmup:
                r["times"].append(time.perf_counter() - t0)
    ref = runs[0]["times"]
    rows = [{"label": r["label"], "iter_s": statistics.median(r["times"]),
             "ratio": statistics.median(r["times"]) / statistics.median(ref),
             "paired_ratio": statistics.median(t / t0 for t, t0 in zip(r["times"], ref)),
             "target": PES_TARGETS.get(r["kind"]),
             "n_meta": sum(v.numel() for v in r["meta"].values())} for r in runs]
    load_end = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    desc = (f"Digits MLP 64-{hidden}-10, batch {batch}; one PES iteration = {particles} particles (vmapped) × "
            f"{truncation} inner steps; median of {repeats} interleaved rounds after {warmup} warm-up "
            f"(load average at the end: {load_end}). GradMetaNet width 8, E = 4 outputs per entry, 4 "
            "layers / attention blocks unless stated, 1 attention head; per-parameter MLP hidden 32.")
    return {"name": "pes_digits", "description": desc, "load_avg_at_end": load_end, "results": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models and few repeats (smoke test)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--stem", default=None,
                    help="name of the result files (default: lopt_step, or lopt_pes for --suite pes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--suite", choices=("all", "step", "pes"), default="all")
    ap.add_argument("--pes-repeats", type=int, default=15, help="interleaved PES rounds (medians)")
    ap.add_argument("--only", nargs="+", help="PES suite: only the rules whose label contains one of these strings "
                    "(and the per-parameter reference)")
    add_allocator_option(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    suffix = set_allocator(args.allocator)
    if args.suite in ("all", "pes"):
        pes = (run_pes(8, 16, 2, 2, 2, 1, args.only) if args.quick else
               run_pes(32, args.batch, 16, 10, args.pes_repeats, 1, args.only))
        data = {"benchmark": "lopt_pes",
                "title": "One PES meta-training iteration: GradMetaNet learned optimizers vs the per-parameter one",
                "environment": environment("cpu"), "settings": {"threads": args.threads, "quick": args.quick,
                                                                 "allocator": args.allocator},
                "columns": [{"key": "label", "header": "learned optimizer"},
                            {"key": "iter_s", "header": "PES iteration", "format": "ms"},
                            {"key": "ratio", "header": "vs per-parameter", "format": "ratio"},
                            {"key": "paired_ratio", "header": "paired", "format": "ratio"},
                            {"key": "target", "header": "target", "format": "ratio"},
                            {"key": "n_meta", "header": "meta-parameters"}],
                "cases": [pes]}
        stem = args.stem if args.suite == "pes" and args.stem else "lopt_pes"
        js, md = write_results(data, args.out, stem + suffix)
        print(md.read_text())
    if args.suite == "pes":
        return 0
    if args.quick:
        cases = [("digits", [64, 32, 10], 5, 2), ("mlp1024", [784, 64, 64, 10], 3, 1)]
    else:
        cases = [("digits", [64, 32, 10], 300, 30), ("mlp1024", [784, 1024, 1024, 10], 15, 3)]
    results = [run_case(n, w, args.batch, r, wu) for n, w, r, wu in cases]
    data = {
        "benchmark": "lopt_step", "title": "LearnedOptimizer vs torch.optim.Adam: step time and state size",
        "environment": environment("cpu"), "settings": {"batch": args.batch, "threads": args.threads,
                                                        "quick": args.quick, "allocator": args.allocator},
        "columns": [{"key": "label", "header": "optimizer"},
                    {"key": "step_s", "header": "full step", "format": "ms"},
                    {"key": "update_s", "header": "optimizer step alone", "format": "ms"},
                    {"key": "ratio", "header": "full step vs Adam", "format": "ratio"},
                    {"key": "target", "header": "target", "format": "ratio"},
                    {"key": "mlp_s", "header": "rule's MLP products alone", "format": "ms"},
                    {"key": "measured_floor", "header": "floor: (fwd+bwd + MLP) vs Adam", "format": "ratio"},
                    {"key": "floor", "header": "arithmetic floor (MACs)", "format": "ratio"},
                    {"key": "state_ratio", "header": "state / params", "format": "ratio"}],
        "cases": results,
    }
    js, md = write_results(data, args.out, (args.stem or "lopt_step") + suffix)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
