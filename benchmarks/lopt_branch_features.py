"""What the branch of a learned optimizer hands to its per-parameter MLP: how much of each feature
is one number per parameter tensor.

For ``GradMetaNetLO`` (base, GradMetaNet++, weight-aware) and ``WeightSpaceLO``, freshly initialised
(meta-seeds 0-2) or read from ``lopt_meta_train`` run folders (``--runs``), on a few batches of the
inner task at its initialisation: for every parameter tensor and output channel of the branch, the
*varying share* ``var / (mean² + var)`` of its second moment over the tensor's entries (0: the same
value for every entry; the MLP divides each feature by its RMS over the tensor, so a feature with a
varying share of 10⁻³ reaches it as nearly the same number everywhere) and the correlation of the
feature with ``|∇|`` over the entries. ``center_branch=True`` removes the per-tensor mean (varying
share 1 by construction).

    python benchmarks/lopt_branch_features.py [--task fashion_mnist --data-root DIR] [--runs FOLDER ...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import environment, write_results  # noqa: E402


def fresh_rules(task):
    from gradmeta.lopt import GradMetaNetLO, WeightSpaceLO

    return {"GradMetaNet (base), 16 examples": lambda: GradMetaNetLO(task, examples=16),
            "GradMetaNet++, 16 examples": lambda: GradMetaNetLO(task, variant="plusplus", examples=16),
            "GradMetaNet, weight-aware, 16 examples": lambda: GradMetaNetLO(task, weight_aware=True, examples=16),
            "weight-space": lambda: WeightSpaceLO(task)}


def branch_features(lo, meta, params, batch, task) -> tuple[dict, dict]:
    """``({name: (n, E)} branch features as the MLP receives them before its RMS, {name: (n,)} |∇|)``."""
    x, y = task.split(batch)
    grads, gs, _ = lo.gradients(getattr(lo, "model", task.model), task.loss_fn, params, x, y)
    with torch.no_grad():
        rows = lo.branch_features(meta, grads, params, gs)  # (E, N), centred if the rule centres
    sizes = [params[k].numel() for k in params]
    feats = dict(zip(params, (r.T for r in rows.split(sizes, 1))))
    return feats, {k: grads[k].detach().abs().reshape(-1) for k in params}


def measure(lo, meta, task, batches: int = 5) -> dict:
    """Median (and smallest) over (tensor, channel, batch) of the varying share, and the median of
    |corr(feature, |∇|)|."""
    shares, corrs = [], []
    params = task.init(0)
    data = task.batches(torch.Generator().manual_seed(0), batches)
    for i in range(batches):
        feats, absg = branch_features(lo, meta, params, tuple(b[i] for b in data), task)
        for k, f in feats.items():
            if f.shape[0] < 2:
                continue
            mean, var = f.mean(0), f.var(0)
            shares += (var / (mean.square() + var).clamp_min(1e-30)).tolist()
            for e in range(f.shape[1]):
                c = torch.corrcoef(torch.stack([f[:, e], absg[k]]))[0, 1]
                corrs.append(abs(float(c)) if torch.isfinite(c) else 0.0)
    gate = meta.get("mlp.extra_gate")
    return {"varying_share": statistics.median(shares), "varying_share_min": min(shares),
            "abs_corr_grad": statistics.median(corrs),
            "max_abs_gate": None if gate is None else float(gate.abs().max())}


def main(argv: list[str] | None = None) -> int:
    from gradmeta.experiments.lopt.tasks import _from_run
    from gradmeta.lopt import make_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="digits", help="inner task name (gradmeta.lopt.make_task)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--runs", nargs="*", default=[], help="lopt_meta_train run folders with a branch")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="lopt_branch_features")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = make_task(args.task, hidden=[32], batch_size=128, data_root=args.data_root)
    rows = []
    for label, make in fresh_rules(task).items():
        for seed in range(3):
            lo = make()
            rows.append({"rule": label, "source": f"fresh, meta-seed {seed}", **measure(lo, lo.init_meta(seed), task)})
            print(rows[-1], flush=True)
    for folder in args.runs:
        lo, meta = _from_run(folder, task)
        if not hasattr(lo, "branch_features"):
            raise SystemExit(f"{folder}: its optimizer has no branch")
        label = type(lo).__name__ + (" (centred)" if lo.center_branch else "")
        rows.append({"rule": label, "source": Path(folder).name, **measure(lo, meta, task)})
        print(rows[-1], flush=True)
    data = {"benchmark": args.name,
            "title": "Branch features of the learned optimizers: how much they vary within a tensor",
            "environment": environment("cpu"), "settings": {"task": args.task, "runs": args.runs, "batches": 5},
            "columns": [{"key": "rule", "header": "branch"}, {"key": "source", "header": "meta-parameters"},
                        {"key": "varying_share", "header": "varying share (median)", "format": "sci"},
                        {"key": "varying_share_min", "header": "varying share (smallest)", "format": "sci"},
                        {"key": "abs_corr_grad", "header": "|corr(feature, |∇|)| (median)", "format": "num"},
                        {"key": "max_abs_gate", "header": "max |gate|", "format": "num"}],
            "cases": [{"name": args.task, "description": (
                f"{args.task} MLP 64-32-10 at initialisation seed 0, batch 128, 5 batches; per parameter tensor "
                "and branch output channel: varying share = var/(mean² + var) over the tensor's entries, "
                "before the MLP's RMS normalisation (after centring, for a centred rule)."), "results": rows}]}
    js, md = write_results(data, args.out, args.name)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
