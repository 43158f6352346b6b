"""GradMetaNet cost, side by side with the inner model (issue #4, "Performance").

Times, in one process and interleaved round-robin (median of ``--repeats`` after a warm-up):
* ``mlp_step``: one training step (forward, backward, SGD update) of the MLP 784-256-128-10 at B=128;
* ``collect``: ``gm.collect_gradients`` of that batch (the input every gradient-set model needs);
* ``gmn_base`` / ``gmn_plusplus``: forward+backward of GradMetaNet (4 layers, 32 channels,
  per-weight readout) on that gradient set (loss: sum of squares of the readout);
* ``per_param_deepsets``: forward+backward of the per-parameter DeepSets baseline (32 hidden).
Memory: bytes of the tensors autograd saves for backward during one forward (a deterministic
measure of training memory; CPU resident-set peaks are too noisy on a shared machine), for a grid
of batch sizes and MLP widths, plotted against ``B · N`` (N = number of neurons).

Usage::

    python benchmarks/nn.py                   # -> benchmarks/results/nn.{json,md,png}
    python benchmarks/nn.py --quick --out DIR # tiny sizes (smoke test)
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
    nets = {v: gnn.GradMetaNet.for_model(model, readout="weight", variant=v, channels=channels,
                                         set_layers=layers, neuron_layers=2) for v in ("base", "plusplus")}
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
            "gmn_base": fwd_bwd(nets["base"]), "gmn_plusplus": fwd_bwd(nets["plusplus"]),
            "per_param_deepsets": fwd_bwd(pp)}, nets, gs


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


def memory_grid(widths_list, batches, channels, layers, variant):
    rows = []
    for widths in widths_list:
        for B in batches:
            model, x, y = case(widths, B)
            gs = gm.collect_gradients(model, classification_loss, x, y)
            for v in (variant,):
                torch.manual_seed(0)
                net = gnn.GradMetaNet.for_model(model, readout="weight", variant=v, channels=channels,
                                                set_layers=layers, neuron_layers=2)
                P = sum(p.numel() for p in model.parameters())
                rows.append({"variant": v, "widths": widths, "B": B, "N": sum(widths), "P": P,
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
    for v, m in (("base", "o"), ("plusplus", "s")):
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
# Capability experiment: regress per-parameter statistics of a gradient set (issue #4).
CAP_WIDTHS = [64, 24, 10]
TARGETS = ("mean_grad", "fisher_diag", "adam_direction", "natural_grad_last_layer")


def normalised_set(model, x, y):
    """Gradient set with ``A`` and ``Δ`` each divided by their RMS (two scalars per set, so the
    symmetry is kept); targets are computed from this set, making the task scale-free."""
    import dataclasses
    gs = gm.collect_gradients(model, classification_loss, x, y)
    sa = torch.cat([gs[n].activations.flatten() for n in gs.layer_names]).pow(2).mean().sqrt()
    sd = torch.cat([gs[n].backprops.flatten() for n in gs.layer_names]).pow(2).mean().sqrt()
    layers = {n: dataclasses.replace(gs[n], _inputs=gs[n].activations / sa, backprops=gs[n].backprops / sd)
              for n in gs.layer_names}
    return type(gs)(layers, gs.losses)


def targets_of(gs, last="2", damping=0.1):
    m, v = gs.mean_grad(), gs.fisher_diagonal()
    adam = {k: m[k] / (v[k] + 1e-8).sqrt() for k in m}
    pe = gs.per_example_grads()
    names = [f"{last}.weight", f"{last}.bias"]
    G = torch.cat([pe[n].flatten(1) for n in names], 1)             # (B, p) of the last layer
    F = G.T @ G / G.shape[0]
    lam = damping * F.diagonal().mean()
    ng = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), G.mean(0))
    out, k = {}, 0
    for n in names:
        out[n], k = ng[k:k + m[n].numel()].reshape(m[n].shape), k + m[n].numel()
    return {"mean_grad": m, "fisher_diag": v, "adam_direction": adam, "natural_grad_last_layer": out}


def make_sets(n, B, seed):
    from gradmeta.data import load_digits
    data = load_digits("all")
    X, Y = data.flat if not callable(data.flat) else data.flat(), data.labels
    g = torch.Generator().manual_seed(seed)
    sets = []
    for i in range(n):
        torch.manual_seed(seed * 100003 + i)
        model = mlp(CAP_WIDTHS, activation="tanh")
        with torch.no_grad():                       # varied scales of random inits
            for p in model.parameters():
                p.mul_(0.5 + 1.5 * torch.rand((), generator=g))
        idx = torch.randint(0, len(Y), (B,), generator=g)
        gs = normalised_set(model, X[idx], Y[idx])
        sets.append((gs, targets_of(gs)))
    return sets


def cap_models(model, channels):
    torch.manual_seed(0)
    kw = dict(readout="weight", channels=channels, set_layers=2, neuron_layers=2, heads=4)
    return {"GradMetaNet": gnn.GradMetaNet.for_model(model, variant="base", **kw),
            "GradMetaNet++": gnn.GradMetaNet.for_model(model, variant="plusplus", **kw),
            "per-param DeepSets": gnn.PerParamDeepSets(hidden=channels),
            "flat-factor MLP": gnn.FlatFactorMLP.for_model(model, readout="weight", hidden=256),
            "averaged-gradient net": gnn.AveragedGradientNet.for_model(model, channels=channels)}


def rel_err(pred, tgt, sq=False):
    num = sum(((pred[k] - tgt[k]) ** 2).sum() for k in tgt)
    den = sum((tgt[k] ** 2).sum() for k in tgt)
    return num / den if sq else (num / den).sqrt()


def train_eval(net, train, test, target, steps, batch, lr):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch,), generator=g).tolist()
        pred = net([train[i][0] for i in idx])         # one stacked pass over the sets
        loss = sum(rel_err({k: v[j] for k, v in pred.items()}, train[i][1][target], sq=True)
                   for j, i in enumerate(idx)) / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        errs = [rel_err(net(gs), t[target]).item() for gs, t in test]
    return statistics.mean(errs), time.perf_counter() - t0


def capability(a):
    n_train, n_test, steps = (16, 4, 3) if a.quick else (a.train_sets, 48, a.steps)
    channels, batch = (8, 2) if a.quick else (16, 4)
    train, test = make_sets(n_train, 32, 0), make_sets(n_test, 32, 1)
    rows = []
    for target in a.targets or TARGETS:
        for name, net in cap_models(mlp(CAP_WIDTHS), channels).items():
            if a.models and name not in a.models:
                continue
            err, secs = train_eval(net, train, test, target, steps, batch, 3e-3)
            rows.append({"target": target, "model": name, "rel_error": err, "train_seconds": secs})
            print(f"{target:<26} {name:<22} rel. error {err:.4f}  ({secs:.0f}s)", flush=True)
    data = {"environment": environment("cpu"),
            "settings": {"inner": CAP_WIDTHS, "set_size": 32, "train_sets": n_train, "test_sets": n_test,
                         "steps": steps, "batch_sets": batch, "lr": 3e-3, "channels": channels},
            "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.stem or "nn_capability"
    (a.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text(render_capability(data))
    print(render_capability(data))


def render_capability(data) -> str:
    s, models = data["settings"], list(dict.fromkeys(r["model"] for r in data["rows"]))
    lines = [f"Relative test error ‖pred − target‖/‖target‖ (mean over {s['test_sets']} test sets; random "
             f"MLPs {s['inner']}, {s['set_size']} digits per set, {s['train_sets']} training sets, "
             f"{s['steps']} Adam steps)", "", "| target | " + " | ".join(models) + " |",
             "|---|" + "---:|" * len(models)]
    for t in dict.fromkeys(r["target"] for r in data["rows"]):
        vals = {r["model"]: r["rel_error"] for r in data["rows"] if r["target"] == t}
        lines.append(f"| {t} | " + " | ".join(f"{vals[m]:.3f}" for m in models) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="perf", choices=["perf", "capability"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--train-sets", type=int, default=512)
    ap.add_argument("--targets", nargs="*", choices=TARGETS, help="capability targets (default: all)")
    ap.add_argument("--models", nargs="*", help="capability models by name (default: all)")
    ap.add_argument("--stem", help="result file stem (default: nn_capability)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results")
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
    data = {"environment": environment("cpu"),
            "settings": {"widths": widths, "B": B, "channels": channels, "layers": layers, "repeats": repeats},
            "times": time_all({k: f for k, f in fns.items() if k != "gmn_plusplus"}, repeats, warmup=1),
            "memory": memory_grid(grid_w, grid_b, channels, layers, "base")
            + memory_grid(grid_w[-1:], pp_b, channels, layers, "plusplus")}
    # GradMetaNet++ costs O(B·P·c) in its per-datum readout: timed once, after one warm-up call
    data["times"]["gmn_plusplus"] = time_all({"gmn_plusplus": fns["gmn_plusplus"]}, 1, warmup=1)["gmn_plusplus"]
    data["settings"]["plusplus_repeats"] = 1
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "nn.json").write_text(json.dumps(data, indent=1) + "\n")
    (a.out / "nn.md").write_text(render(data))
    plot(data, a.out / "nn_memory.png")
    print(render(data))


if __name__ == "__main__":
    main()
