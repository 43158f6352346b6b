"""Curvature side by side: gradmeta.curvature against curvlinops, PyHessian, BackPACK and
hand-written autograd / torch.func routes, on one model and batch per case, in one run.

Measured:
* time per Hessian-vector product (median of ``--repeats``, contestants interleaved round-robin),
  as a ratio to a plain forward+backward of the mean loss; every product is checked against
  gradmeta's (max relative difference);
* a 100-probe Hutchinson trace, each contestant in a fresh subprocess: wall time including set-up
  and the peak resident memory above the level before the call;
* the top eigenvalue to a fixed tolerance: time, number of HVPs and the error against a tight
  Lanczos reference, Lanczos (residual ≤ tol·|λ|) vs PyHessian's power iteration (relative change ≤ tol);
* the Fisher diagonal: from factors (empirical, MC) vs the per-example-gradient routes
  (torch.func, BackPACK BatchGrad) and BackPACK DiagGGN-MC.

Usage::

    python benchmarks/curvature.py                   # -> benchmarks/results/curvature.{json,md}
    python benchmarks/curvature.py --quick --out DIR # tiny sizes (smoke test)
    python benchmarks/curvature.py --one-trace NAME --model CASE   # one subprocess probe (JSON)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from _common import environment, error_text, peak_memory, write_results
from gradmeta import curvature as gc
from gradmeta.models import GPT, classification_loss, lm_loss, mlp

HERE = Path(__file__).resolve().parent
CASES = ("mlp", "gpt")


class _LMLoss(nn.Module):
    """Mean next-token cross-entropy as a module (for the peers, which take ``nn.Module`` losses)."""
    reduction = "mean"

    def forward(self, logits, y):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_case(name: str, quick: bool):
    torch.manual_seed(0)
    if name == "mlp":
        widths, B = ([64, 32, 16, 10], 32) if quick else ([784, 256, 128, 10], 256)
        model = mlp(widths)
        x, y = torch.randn(B, widths[0]), torch.randint(0, widths[-1], (B,))
        desc = f"MLP {'-'.join(map(str, widths))} (ReLU), B={B}, random inputs and labels, cross-entropy"
        return desc, model, classification_loss, nn.CrossEntropyLoss(), x, y
    V, d, h, L, T, B = (32, 16, 2, 1, 8, 4) if quick else (256, 64, 4, 2, 32, 16)
    model = GPT(V, d, h, L, T)
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    desc = f"GPT (pre-LN) {L} blocks, d={d}, {h} heads, T={T}, vocab {V}, B={B}, random tokens, next-token loss"
    return desc, model, lm_loss, _LMLoss(), x, y


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _clear_grads(model):
    """PyHessian builds its graph with ``loss.backward(create_graph=True)``, which ACCUMULATES into
    ``.grad``: a second instance on the same model would otherwise see twice the Hessian."""
    for p in model.parameters():
        p.grad = None


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


# ----------------------------------------------------------------------------- HVP contestants
def hvp_contestants(model, loss_fn, peer_loss, x, y):
    """name -> (set-up seconds, fn(v_flat) -> Hv_flat)."""
    params = _params(model)
    shapes = [p.shape for p in params]
    split = lambda v: [t.view(s) for t, s in zip(v.split([p.numel() for p in params]), shapes)]
    out = {}

    def setup(name, build):
        t0 = time.perf_counter()
        try:
            fn = build()
            out[name] = (time.perf_counter() - t0, fn)
        except Exception as e:  # a peer that cannot handle the model is reported, not hidden
            out[name] = (None, e)

    setup("gradmeta HessianOperator (graph reuse)", lambda: gc.HessianOperator(model, loss_fn, (x, y)).matvec)
    setup("gradmeta HessianOperator (reuse_graph=False)",
          lambda: gc.HessianOperator(model, loss_fn, (x, y), reuse_graph=False).matvec)

    def plain(v):
        g = torch.autograd.grad(loss_fn(model(x), y).mean(), params, create_graph=True)
        return _flat(torch.autograd.grad(g, params, split(v)))
    setup("plain double-backward", lambda: plain)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = {n: p.detach() for n, p in zip(names, params)}
    f = lambda th: loss_fn(functional_call(model, th, (x,)), y).mean()

    def func_hvp(v):
        return _flat(jvp(grad(f), (theta,), (dict(zip(names, split(v))),))[1].values())
    setup("torch.func jvp(grad)", lambda: func_hvp)

    def curvlinops_build():
        from curvlinops import HessianLinearOperator
        H = HessianLinearOperator(model, peer_loss, params, [(x, y)], check_deterministic=False)
        return lambda v: H @ v
    setup("curvlinops HessianLinearOperator", curvlinops_build)

    def pyhessian_build():
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product
        _clear_grads(model)
        ph = hessian(model, peer_loss, data=(x, y), cuda=False)
        _clear_grads(model)  # PyHessian keeps its graph in ph.gradsH; .grad would leak into later runs
        return lambda v: _flat(hessian_vector_product(ph.gradsH, ph.params, split(v)))
    setup("PyHessian (stored graph)", pyhessian_build)
    return out


def fwd_bwd(model, loss_fn, x, y):
    params = _params(model)
    return lambda: torch.autograd.grad(loss_fn(model(x), y).mean(), params)


def bench_hvp(model, loss_fn, peer_loss, x, y, repeats):
    cont = hvp_contestants(model, loss_fn, peer_loss, x, y)
    base = fwd_bwd(model, loss_fn, x, y)
    P = sum(p.numel() for p in _params(model))
    v = torch.randn(P, generator=torch.Generator().manual_seed(1))
    ref = cont["gradmeta HessianOperator (graph reuse)"][1](v)
    times = {n: [] for n in cont}
    times["plain forward+backward"] = []
    for r in range(repeats + 1):  # round 0 is the warm-up
        for n, (_, fn) in cont.items():
            if isinstance(fn, Exception):
                continue
            t0 = time.perf_counter()
            fn(v)
            if r:
                times[n].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        base()
        if r:
            times["plain forward+backward"].append(time.perf_counter() - t0)
    t_base = statistics.median(times["plain forward+backward"])
    rows = [{"method": "plain forward+backward (reference)", "time": t_base, "ratio": 1.0}]
    for n, (t_setup, fn) in cont.items():
        if isinstance(fn, Exception):
            rows.append({"method": n, "error": error_text(fn)})
            continue
        hv = fn(v).detach()
        t = statistics.median(times[n])
        rows.append({"method": n, "time": t, "ratio": t / t_base, "setup": t_setup,
                     "rel_diff": ((hv - ref).norm() / ref.norm()).item()})
    return rows


# ----------------------------------------------------------------------------- trace (subprocess)
TRACE = ("gradmeta hutchinson", "gradmeta hutch++", "PyHessian trace", "curvlinops hutchinson_trace")


def one_trace(name: str, case: str, quick: bool, samples: int) -> dict:
    desc, model, loss_fn, peer_loss, x, y = make_case(case, quick)
    # warm up the kernels on a tiny slice so one-time costs are not charged to the contestant
    gc.hvp(model, loss_fn, (x[:2], y[:2]), {n: torch.zeros_like(p) for n, p in model.named_parameters()})

    def run():
        if name == "gradmeta hutchinson":
            return gc.hessian_trace(model, loss_fn, (x, y), num_samples=samples, generator=0).item(), samples
        if name == "gradmeta hutch++":
            return gc.hessian_trace(model, loss_fn, (x, y), num_samples=samples - samples % 3,
                                    method="hutch++", generator=0).item(), samples - samples % 3
        if name == "PyHessian trace":
            from pyhessian import hessian
            torch.manual_seed(0)
            ph = hessian(model, peer_loss, data=(x, y), cuda=False)
            vals = ph.trace(maxIter=samples, tol=0.0)  # tol=0: meant to run all probes, but PyHessian
            return float(sum(vals) / len(vals)), len(vals)  # stops early when its running mean is < 0
        if name == "curvlinops hutchinson_trace":
            from curvlinops import HessianLinearOperator, hutchinson_trace
            torch.manual_seed(0)
            H = HessianLinearOperator(model, peer_loss, _params(model), [(x, y)], check_deterministic=False)
            return hutchinson_trace(H, samples).item(), samples
        raise ValueError(name)

    t0 = time.perf_counter()
    (est, hvps), peak, how = peak_memory(run, "cpu")
    return {"method": name, "time": time.perf_counter() - t0, "peak_mem": peak, "estimate": est, "hvps": hvps,
            "mem_how": how}


def bench_trace(case, quick, samples, rounds):
    """Every contestant ``rounds`` times in fresh processes, interleaved; the median run is reported."""
    runs: dict[str, list] = {name: [] for name in TRACE}
    for _ in range(rounds):
        for name in TRACE:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one-trace", name, "--model", case,
                   "--samples", str(samples), "--threads", str(torch.get_num_threads())] + (["--quick"] if quick else [])
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
            try:
                runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            except (IndexError, json.JSONDecodeError):
                runs[name].append({"method": name, "error": (res.stderr.strip().splitlines() or ["no output"])[-1][:300]})
    rows = []
    for name, rs in runs.items():
        ok = sorted((r for r in rs if "error" not in r), key=lambda r: r["time"])
        rows.append(dict(ok[len(ok) // 2], rounds=len(ok)) if ok else rs[0])
    return rows


# ----------------------------------------------------------------------------- top eigenvalue
def bench_eig(model, loss_fn, peer_loss, x, y, tols):
    op = gc.HessianOperator(model, loss_fn, (x, y))
    lam = gc.top_eigenvalues(op, 1, tol=1e-9, max_matvecs=400, generator=123).eigenvalues[0].item()
    rows = []
    for tol in tols:
        op = gc.HessianOperator(model, loss_fn, (x, y))
        t0 = time.perf_counter()
        r = gc.top_eigenvalues(op, 1, tol=tol, max_matvecs=400, generator=0, check_every=1)
        t = time.perf_counter() - t0
        rows.append({"method": "gradmeta Lanczos", "tol": tol, "hvps": r.num_matvecs, "time": t,
                     "eigenvalue": r.eigenvalues[0].item(), "rel_err": abs(r.eigenvalues[0].item() - lam) / abs(lam)})
        try:
            import pyhessian  # noqa: F401  (the package shadows its submodule name with the class)
            phh = sys.modules["pyhessian.hessian"]
            counter = {"n": 0}
            orig = phh.hessian_vector_product

            def counted(*a, **k):
                counter["n"] += 1
                return orig(*a, **k)
            phh.hessian_vector_product = counted
            try:
                torch.manual_seed(0)
                _clear_grads(model)
                ph = phh.hessian(model, peer_loss, data=(x, y), cuda=False)
                t0 = time.perf_counter()
                vals, _ = ph.eigenvalues(maxIter=400, tol=tol, top_n=1)
                t = time.perf_counter() - t0
            finally:
                phh.hessian_vector_product = orig
                _clear_grads(model)
            rows.append({"method": "PyHessian power iteration", "tol": tol, "hvps": counter["n"], "time": t,
                         "eigenvalue": vals[0], "rel_err": abs(vals[0] - lam) / abs(lam)})
        except Exception as e:
            rows.append({"method": "PyHessian power iteration", "tol": tol, "error": error_text(e)})
    return lam, rows


# ----------------------------------------------------------------------------- Fisher diagonal
def bench_fisher(model, loss_fn, peer_loss, x, y, repeats):
    cont = {
        "gradmeta from factors (empirical)": lambda: gc.fisher_diagonal(model, loss_fn, (x, y), route="factors"),
        "gradmeta per-example route (torch.func, empirical)":
            lambda: gc.fisher_diagonal(model, loss_fn, (x, y), route="per_example"),
        "gradmeta from factors (MC, 1 sample)": lambda: gc.fisher_diagonal(
            model, loss_fn, (x, y), kind="mc", likelihood="categorical", generator=0, route="factors"),
    }
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad, DiagGGNMC
        bmodel, bloss = extend(copy.deepcopy(model)), extend(copy.deepcopy(peer_loss))
        bparams = _params(bmodel)
        B = x.shape[0]

        def bp_batchgrad():
            loss = bloss(bmodel(x), y)
            with backpack(BatchGrad()):
                loss.backward()
            return {i: (p.grad_batch ** 2).sum(0) * B for i, p in enumerate(bparams)}

        def bp_diagggn():
            loss = bloss(bmodel(x), y)
            with backpack(DiagGGNMC(mc_samples=1)):
                loss.backward()
            return {i: p.diag_ggn_mc for i, p in enumerate(bparams)}
        for name, fn in (("BackPACK BatchGrad (per-example route, empirical)", bp_batchgrad),
                         ("BackPACK DiagGGN-MC (1 sample)", bp_diagggn)):
            try:
                fn()
                cont[name] = fn
            except Exception as e:  # e.g. custom modules BackPACK has no rule for
                cont[name] = e
    except Exception as e:
        cont["BackPACK"] = e
    times = {n: [] for n in cont}
    for r in range(repeats + 1):
        for n, fn in cont.items():
            if isinstance(fn, Exception):
                continue
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:
                cont[n] = e
                continue
            if r:
                times[n].append(time.perf_counter() - t0)
    ref = _flat(cont["gradmeta per-example route (torch.func, empirical)"]().values())
    t_pe = statistics.median(times["gradmeta per-example route (torch.func, empirical)"])
    rows = []
    for n, fn in cont.items():
        if isinstance(fn, Exception):
            rows.append({"method": n, "error": error_text(fn)})
            continue
        t = statistics.median(times[n])
        row = {"method": n, "time": t, "speedup": t_pe / t}
        if "empirical" in n:
            val = _flat(fn().values())
            row["rel_diff"] = ((val - ref).norm() / ref.norm()).item()
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- README table
def readme_table(data: dict) -> str:
    """The compact side-by-side table for the README, generated from a results file."""
    by_case: dict[str, dict] = {}
    for c in data["cases"]:
        case, part = c["name"].split(": ", 1)
        by_case.setdefault(case, {})[part.split(",")[0]] = {r["method"]: r for r in c["results"]}
    cases = list(by_case)
    ms = lambda t: f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"
    mb = lambda b: f"{b / 2**20:.0f} MiB"

    def cell(case, part, method, f):
        r = by_case[case].get(part, {}).get(method)
        return "—" if r is None else ("not supported" if "error" in r else f(r))

    rows = []
    for m in ("gradmeta HessianOperator (graph reuse)", "PyHessian (stored graph)", "plain double-backward",
              "torch.func jvp(grad)", "curvlinops HessianLinearOperator"):
        rows.append([f"HVP: {m}"] + [cell(c, "time per Hessian-vector product", m,
                                          lambda r: f"{ms(r['time'])} ({r['ratio']:.2f}× fwd+bwd)") for c in cases])
    part = next(k for k in by_case[cases[0]] if k.startswith("Hutchinson"))
    for m in ("gradmeta hutchinson", "PyHessian trace", "curvlinops hutchinson_trace"):
        rows.append([f"{part}: {m}"] + [cell(c, part, m, lambda r: f"{ms(r['time'])}, {mb(r['peak_mem'])}")
                                         for c in cases])
    for m in ("gradmeta Lanczos", "PyHessian power iteration"):
        for tol in (1e-3, 1e-4):  # several rows share a method name: select by tolerance
            vals = []
            for c in cases:
                rs = [r for cc in data["cases"] if cc["name"] == f"{c}: top eigenvalue" for r in cc["results"]
                      if r["method"] == m and r.get("tol") == tol]
                vals.append("—" if not rs else "not supported" if "error" in rs[0] else
                            f"{rs[0]['hvps']} HVPs, {ms(rs[0]['time'])}, rel. err {rs[0]['rel_err']:.0e}")
            rows.append([f"top eigenvalue, tol {tol:g}: {m}"] + vals)
    for m in ("gradmeta from factors (empirical)", "gradmeta per-example route (torch.func, empirical)",
              "BackPACK BatchGrad (per-example route, empirical)", "gradmeta from factors (MC, 1 sample)",
              "BackPACK DiagGGN-MC (1 sample)"):
        rows.append([f"Fisher diagonal: {m}"] + [cell(c, "Fisher diagonal", m, lambda r: ms(r["time"])) for c in cases])
    head = ["", *cases]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    descs = {c["name"].split(": ")[0]: c["description"] for c in data["cases"] if "Hessian-vector" in c["name"]}
    lines += [""] + [f"`{c}`: {descs.get(c, '')}." for c in cases]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
COLUMNS = [
    {"key": "method", "header": "method"},
    {"key": "time", "header": "time", "format": "ms"},
    {"key": "ratio", "header": "× fwd+bwd", "format": "ratio"},
    {"key": "speedup", "header": "speed-up vs per-example route", "format": "ratio"},
    {"key": "setup", "header": "set-up", "format": "ms"},
    {"key": "tol", "header": "tol", "format": "sci"},
    {"key": "hvps", "header": "HVPs"},
    {"key": "estimate", "header": "estimate"},
    {"key": "eigenvalue", "header": "eigenvalue"},
    {"key": "rel_err", "header": "rel. error", "format": "sci"},
    {"key": "rel_diff", "header": "rel. diff vs gradmeta", "format": "sci"},
    {"key": "peak_mem", "header": "peak memory", "format": "bytes"},
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--samples", type=int, default=100, help="Hutchinson probes")
    p.add_argument("--trace-rounds", type=int, default=3, help="fresh-process runs per trace contestant (median)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, multi-threaded kernels spin-wait "
                        "on busy cores and timings lose all meaning)")
    p.add_argument("--readme", type=Path, help="print the README table of this results file and exit")
    p.add_argument("--one-trace", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.readme:
        print(readme_table(json.loads(args.readme.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    if args.one_trace:
        print(json.dumps(one_trace(args.one_trace, args.model, args.quick, args.samples)))
        return 0
    repeats = args.repeats or (2 if args.quick else 7)
    cases, summary = [], {}
    for case in args.cases.split(","):
        desc, model, loss_fn, peer_loss, x, y = make_case(case, args.quick)
        n_params = sum(q.numel() for q in model.parameters())
        desc = f"{desc}; {n_params:,} parameters"
        print(f"[{case}] HVP", file=sys.stderr)
        hvp = bench_hvp(model, loss_fn, peer_loss, x, y, repeats)
        print(f"[{case}] trace", file=sys.stderr)
        trace = bench_trace(case, args.quick, args.samples, args.trace_rounds)
        print(f"[{case}] eigenvalue", file=sys.stderr)
        lam, eig = bench_eig(model, loss_fn, peer_loss, x, y, (1e-3, 1e-4))
        print(f"[{case}] Fisher", file=sys.stderr)
        fisher = bench_fisher(model, loss_fn, peer_loss, x, y, repeats)
        cases += [
            {"name": f"{case}: time per Hessian-vector product", "description": desc, "results": hvp},
            {"name": f"{case}: Hutchinson trace, {args.samples} probes", "description":
                f"Each in a fresh process, {args.trace_rounds} rounds interleaved, the median-time run shown; "
                "time includes building the operator; memory = peak RSS above the level before the call. "
                "gradmeta and PyHessian draw the same Rademacher probes from seed 0, hence the same estimate.",
             "results": trace},
            {"name": f"{case}: top eigenvalue", "description":
                f"Reference λ_max = {lam:.6g} (Lanczos, residual 1e-9). Lanczos stops when the Ritz residual "
                "≤ tol·|λ| (a bound on the error); PyHessian when the relative change between power "
                "iterations ≤ tol.", "results": eig},
            {"name": f"{case}: Fisher diagonal", "description":
                "Empirical rows are checked against the torch.func per-example route; MC rows are a "
                "different (random) estimate of the GGN diagonal.", "results": fisher},
        ]
        ok = lambda rows: {r["method"]: r for r in rows if "error" not in r}
        h, t, f = ok(hvp), ok(trace), ok(fisher)
        peers = [r["time"] for n, r in h.items() if n.startswith(("curvlinops", "PyHessian"))]
        if peers:
            summary[f"{case}: HVP time, gradmeta / fastest peer"] = \
                h["gradmeta HessianOperator (graph reuse)"]["time"] / min(peers)
        for peer in ("PyHessian trace", "curvlinops hutchinson_trace"):
            if peer in t and "gradmeta hutchinson" in t:
                summary[f"{case}: trace time, {peer} / gradmeta"] = t[peer]["time"] / t["gradmeta hutchinson"]["time"]
        if "gradmeta from factors (empirical)" in f:
            summary[f"{case}: Fisher diagonal, per-example route / factors"] = f["gradmeta from factors (empirical)"]["speedup"]
    data = {"title": "Curvature: gradmeta vs curvlinops, PyHessian, BackPACK", "benchmark": "curvature",
            "environment": environment("cpu", ("curvlinops-for-pytorch", "backpack-for-pytorch", "PyHessian")),
            "settings": {"quick": args.quick, "repeats": repeats, "samples": args.samples,
                         "trace_rounds": args.trace_rounds, "threads": args.threads},
            "columns": COLUMNS, "cases": cases, "summary": summary,
            "notes": ["Time: median over repeats after one warm-up, contestants interleaved round-robin.",
                      "The machine is shared; load_avg_at_start in the environment says how busy it was."]}
    js, md = write_results(data, args.out, "curvature")
    print(f"wrote {js} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
