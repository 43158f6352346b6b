"""GradMetaNet cost (time and training memory), side by side with the inner model.

Times, in one process and interleaved round-robin (median of ``--repeats`` after a warm-up):
* ``mlp_step``: one training step (forward, backward, SGD update) of the MLP 784-256-128-10 at B=128;
* ``collect``: ``gm.collect_gradients`` of that batch (the input every gradient-set model needs);
* ``gmn_base`` / ``gmn_plusplus``: forward+backward of GradMetaNet (4 layers, 32 channels,
  per-weight readout) on that gradient set (loss: sum of squares of the readout);
* ``per_param_deepsets``: forward+backward of the per-parameter DeepSets baseline (32 hidden);
* ``gmn_base_bilinear`` / ``gmn_plusplus_bilinear``: the same GradMetaNets with the bilinear
  per-weight readout (``product="bilinear"``, read per datum before pooling).
Memory: bytes of the tensors autograd saves for backward during one forward (a deterministic
measure of training memory; CPU resident-set peaks are too noisy on a shared machine), for a grid
of batch sizes and MLP widths, plotted against ``B · N`` (N = number of neurons).

Usage::

    python benchmarks/nn.py                   # -> benchmarks/results/nn.{json,md,png}
    python benchmarks/nn.py --quick --out DIR # tiny sizes (smoke test)
    python benchmarks/nn.py --contestants mlp_step,gmn_base_bilinear --stem nn_bilinear  # a subset
    python benchmarks/nn.py capability        # runs tasks/nn_capability.toml -> results/nn_capability.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

import gradmeta as gm  # noqa: E402
import gradmeta.nn as gnn  # noqa: E402
from gradmeta.models import classification_loss, mlp  # noqa: E402

HERE = Path(__file__).resolve().parent
PRODUCTS = gnn.PRODUCTS
# contestant -> (variant, product) of its saved-for-backward memory grid
_MEMORY = {"gmn_base": ("base", "gelu"), "gmn_plusplus": ("plusplus", "gelu"),
           "gmn_base_bilinear": ("base", "bilinear"), "gmn_plusplus_bilinear": ("plusplus", "bilinear")}


def saved_bytes(fn) -> int:
    """Bytes of distinct storages that autograd saves for backward while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def case(widths, B, seed=0):
    torch.manual_seed(seed)
    model = mlp(widths)
    x, y = torch.randn(B, widths[0]), torch.randint(0, widths[-1], (B,))
    return model, x, y


def contestants(widths, B, channels, layers):
    model, x, y = case(widths, B)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gs = gm.collect_gradients(model, classification_loss, x, y)
    nets = {(v, pr): gnn.GradMetaNet.for_model(model, readout="weight", variant=v, channels=channels,
                                               set_layers=layers, neuron_layers=2, product=pr)
            for v in ("base", "plusplus") for pr in PRODUCTS}
    pp = gnn.PerParamDeepSets(hidden=channels)

    def mlp_step():
        opt.zero_grad()
        classification_loss(model(x), y).mean().backward()
        opt.step()

    def fwd_bwd(net):
        def run():
            net.zero_grad()
            out = net(gs)
            sum((v ** 2).sum() for v in out.values()).backward()
        return run

    return {"mlp_step": mlp_step,
            "collect": lambda: gm.collect_gradients(model, classification_loss, x, y),
            "gmn_base": fwd_bwd(nets["base", "gelu"]), "gmn_plusplus": fwd_bwd(nets["plusplus", "gelu"]),
            "per_param_deepsets": fwd_bwd(pp),
            "gmn_base_bilinear": fwd_bwd(nets["base", "bilinear"]),
            "gmn_plusplus_bilinear": fwd_bwd(nets["plusplus", "bilinear"])}, nets, gs


def time_all(fns, repeats, warmup):
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def memory_grid(widths_list, batches, channels, layers, variant, product="gelu"):
    rows = []
    for widths in widths_list:
        for B in batches:
            model, x, y = case(widths, B)
            gs = gm.collect_gradients(model, classification_loss, x, y)
            for v in (variant,):
                torch.manual_seed(0)
                net = gnn.GradMetaNet.for_model(model, readout="weight", variant=v, channels=channels,
                                                set_layers=layers, neuron_layers=2, product=product)
                P = sum(p.numel() for p in model.parameters())
                rows.append({"variant": v + ("" if product == "gelu" else f" ({product})"), "widths": widths, "B": B, "N": sum(widths), "P": P,
                             "saved_bytes": saved_bytes(lambda: net(gs))})
    return rows


def render(data) -> str:
    s = data["settings"]
    lines = [f"# GradMetaNet cost (device: {data['environment']['device']}, torch "
             f"{data['environment']['torch']}, {data['environment']['torch_threads']} thread(s))", "",
             f"MLP {s['widths']} at B={s['B']}; GradMetaNet: {s['layers']} layers, {s['channels']} channels, "
             "per-weight readout. Median of "
             f"{s['repeats']} interleaved repeats.", "", "| contestant | time (ms) | × MLP training step |",
             "|---|---:|---:|"]
    base = data["times"]["mlp_step"]
    for k, t in data["times"].items():
        lines.append(f"| {k} | {1e3 * t:.2f} | {t / base:.2f} |")
    lines += ["", "Saved-for-backward memory of one forward (MiB):", "",
              "| variant | widths | B | B·N | P | MiB |", "|---|---|---:|---:|---:|---:|"]
    for r in data["memory"]:
        lines.append(f"| {r['variant']} | {'-'.join(map(str, r['widths']))} | {r['B']} | {r['B'] * r['N']} | "
                     f"{r['P']} | {r['saved_bytes'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for v, m in (("base", "o"), ("plusplus", "s"), ("base (bilinear)", "^"), ("plusplus (bilinear)", "v")):
        rows = [r for r in data["memory"] if r["variant"] == v]
        for widths in sorted({tuple(r["widths"]) for r in rows}):
            rr = sorted((r for r in rows if tuple(r["widths"]) == widths), key=lambda r: r["B"])
            ax.plot([r["B"] * r["N"] for r in rr], [r["saved_bytes"] / 2**20 for r in rr], marker=m,
                    label=f"{v} {'-'.join(map(str, widths))}")
    ax.set_xlim(left=0), ax.set_ylim(bottom=0)  # linear axes: a straight line is linear growth
    ax.set_xlabel("B · N (examples × neurons)"), ax.set_ylabel("saved for backward (MiB)")
    ax.legend(fontsize=6), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------
# Capability experiment: the task ``nn_capability`` (gradmeta/experiments/nn/capability.py)
def capability(a):
    """Run the spec into ``runs/<stem>`` and write ``<out>/<stem>.{json,md,png}`` from its metrics."""
    from gradmeta.experiments.nn.capability import render_capability
    from gradmeta.run import load_spec, run_spec

    stem = a.stem or Path(a.spec).stem
    folder = run_spec(a.spec, Path("runs") / stem, overwrite=True, progress=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    spec = load_spec(folder / "spec.resolved.toml")
    env = json.loads((folder / "run.json").read_text())["environment"]
    data = {"environment": env, "spec": spec, "status": metrics["status"], "summary": metrics["summary"],
            "history": metrics["history"]}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text(render_capability(spec, metrics["summary"], env))
    for plot in metrics["plots"]:  # training curves
        (a.out / f"{stem}.png").write_bytes((folder / plot).read_bytes())
    print(render_capability(spec, metrics["summary"], env))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="perf", choices=["perf", "capability"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--spec", default=str(HERE.parent / "tasks" / "nn_capability.toml"),
                    help="capability: the task spec to run (default: tasks/nn_capability.toml)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--contestants", help="perf: comma-separated subset to time and measure (default: all)")
    ap.add_argument("--stem", help="perf: result files <out>/<stem>.{json,md}, <stem>_memory.png (default: nn); "
                    "capability: run folder runs/<stem> and result file stem (default: spec stem)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.mode == "capability":
        return capability(a)
    if a.quick:
        widths, B, channels, layers, repeats = [20, 16, 8, 4], 8, 8, 2, 2
        grid_w, grid_b, pp_b = [[20, 16, 8, 4]], [4, 8], [4, 8]
    else:
        widths, B, channels, layers, repeats = [784, 256, 128, 10], 128, 32, 4, a.repeats
        grid_w, grid_b, pp_b = [[784, 256, 128, 10], [392, 128, 64, 10]], [16, 32, 64, 128, 256], [8, 16, 32]
    fns, _, _ = contestants(widths, B, channels, layers)
    chosen = a.contestants.split(",") if a.contestants else list(fns)
    bad = [k for k in chosen if k not in fns]
    if bad or "mlp_step" not in chosen:
        ap.error(f"--contestants: unknown {bad} or no mlp_step (the unit); choose from {', '.join(fns)}")
    data = {"environment": environment("cpu"),
            "settings": {"widths": widths, "B": B, "channels": channels, "layers": layers, "repeats": repeats},
            "times": time_all({k: fns[k] for k in chosen if k != "gmn_plusplus"}, repeats, warmup=1), "memory": []}
    for name, (variant, product) in _MEMORY.items():
        if name in chosen:
            data["memory"] += (memory_grid(grid_w, grid_b, channels, layers, variant, product) if variant == "base"
                               else memory_grid(grid_w[-1:], pp_b, channels, layers, variant, product))
    if "gmn_plusplus" in chosen:
        # GradMetaNet++ costs O(B·P·c) in its per-datum gelu readout: timed once, after one warm-up call
        data["times"]["gmn_plusplus"] = time_all({"gmn_plusplus": fns["gmn_plusplus"]}, 1, warmup=1)["gmn_plusplus"]
        data["settings"]["plusplus_repeats"] = 1
    stem = a.stem or "nn"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text(render(data))
    plot(data, a.out / f"{stem}_memory.png")
    print(render(data))


if __name__ == "__main__":
    main()
