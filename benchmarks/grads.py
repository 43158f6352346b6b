"""Per-example gradients side by side: gradmeta (hooks, torch.func) against Opacus, BackPACK,
a hand-written ``torch.func`` ``vmap(grad)`` and a naive per-example loop.

Every contestant runs on its own copy of the same model (same weights) and the same random
batch, in one process, interleaved round-robin so that load drifts hit all of them alike. Time:
median over ``--repeats`` calls after ``--warmup`` calls, and the ratio to a plain
forward+backward of the mean loss. Memory: each contestant again in a fresh subprocess
(``--one NAME --model CASE``), warmed up on 2 examples, then one call: peak minus the level
right before it (CPU: resident set; CUDA: ``torch.cuda.max_memory_allocated``). Agreement: every contestant's per-example gradients
against a ``torch.func`` reference computed in chunks, outside the timed region.

Usage::

    python benchmarks/grads.py                    # full run -> benchmarks/results/grads.{json,md}
    python benchmarks/grads.py --quick --out DIR  # tiny sizes, 2 repeats (smoke test)
    python benchmarks/grads.py --one hooks --model mlp_b512  # one memory probe, JSON on stdout
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.func import functional_call, grad, vmap

from _common import environment, error_text, peak_memory, sync, write_results
from gradmeta.models import GPT, classification_loss, lm_loss, mlp

HERE = Path(__file__).resolve().parent
Grads = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One model and one random batch. ``naive_batch`` examples are used by the naive loop."""
    name: str
    description: str
    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    naive_batch: int

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]


CASES = ("mlp_b128", "mlp_b512", "gpt")


def make_case(name: str, quick: bool, device: str) -> Case:
    """Build ``name`` (one of ``CASES``) with fixed seeds; ``quick`` shrinks everything."""
    torch.manual_seed(0)
    if name.startswith("mlp"):
        widths = [32, 24, 16, 10] if quick else [784, 1024, 512, 256, 128, 64, 10]
        B = {"mlp_b128": 128, "mlp_b512": 512}[name] // (16 if quick else 1)
        model = mlp(widths)
        x, y = torch.randn(B, widths[0]), torch.randint(0, widths[-1], (B,))
        desc = f"MLP {'-'.join(map(str, widths))} (ReLU), B={B}, random inputs and labels"
        loss_fn, naive = classification_loss, min(B, 4 if quick else 16)
    elif name == "gpt":
        V, d, h, L, T, B = (32, 16, 2, 1, 8, 4) if quick else (256, 128, 4, 4, 64, 16)
        model = GPT(V, d, h, L, T)
        x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
        desc = (f"GPT (pre-LN) {L} blocks, d={d}, {h} heads, T={T}, vocab {V}, B={B}, "
                "random tokens, per-example mean next-token loss")
        loss_fn, naive = lm_loss, min(B, 2 if quick else 4)
    else:
        raise ValueError(f"benchmarks/grads.py: unknown case {name!r}; choose from {CASES}")
    n_params = sum(p.numel() for p in model.parameters())
    return Case(name, f"{desc}; {n_params:,} parameters", model.to(device), loss_fn,
                x.to(device), y.to(device), naive)


# ----------------------------------------------------------------------------- contestants
@dataclass
class Prepared:
    """A contestant ready to run: ``run()`` is timed; the rest happens outside the timing."""
    run: Callable[[], Any]
    grads: Callable[[Any], Grads]       # result -> {param: (rows, *shape)} (plain: mean grad)
    nbytes: Callable[[Any], int]        # result -> analytic bytes of what the call returns
    kind: str = "per_example"           # "per_example" or "mean"
    rows: int | None = None             # examples covered (naive loop: a sub-batch)
    note: str = ""
    extra: dict = field(default_factory=dict)


def _bytes(tensors) -> int:
    """Bytes of distinct tensors (views of one storage counted once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _take(model: torch.nn.Module, attr: str) -> dict:
    """Move the peers' per-example gradients off the parameters into the returned dict, so that
    they are freed with the result and not kept alive into the next call."""
    out = {}
    for n, p in model.named_parameters():
        out[n] = getattr(p, attr, None)
        if hasattr(p, attr):
            setattr(p, attr, None)
    return out


def _fresh(case: Case) -> torch.nn.Module:
    return copy.deepcopy(case.model)


def _plain(case: Case) -> Prepared:
    model = _fresh(case)

    def run():
        model.zero_grad(set_to_none=True)
        case.loss_fn(model(case.x), case.y).mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}
    return Prepared(run, lambda r: r, lambda r: _bytes(r.values()), kind="mean",
                    note="the floor: parameter gradients of the mean loss only")


def _hooks(case: Case) -> Prepared:
    import gradmeta as gm
    model = _fresh(case)

    def run():
        model.zero_grad(set_to_none=True)
        return gm.collect_gradients(model, case.loss_fn, case.x, case.y)

    def factors(gs):
        return _bytes(t for n in gs.layer_names for t in (gs[n].activations, gs[n].backprops))
    return Prepared(run, lambda gs: gs.per_example_grads(), factors,
                    note="factors A, Δ; per_example_grads() built only for the check")


def _gm_func(case: Case) -> Prepared:
    import gradmeta as gm
    model = _fresh(case)
    run = lambda: gm.per_example_grads(model, case.loss_fn, case.x, case.y)  # noqa: E731
    return Prepared(run, lambda r: r, lambda r: _bytes(r.values()))


def _opacus(case: Case) -> Prepared:
    from opacus import GradSampleModule
    model = _fresh(case)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def run():
        gsm.zero_grad(set_to_none=True)
        case.loss_fn(gsm(case.x), case.y).sum().backward()
        return _take(model, "grad_sample")
    return Prepared(run, lambda r: r, lambda r: _bytes(r.values()),
                    note="GradSampleModule, hooks (loss_reduction='sum')")


def _backpack(case: Case) -> Prepared:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad
    model = extend(_fresh(case))

    def run():
        model.zero_grad(set_to_none=True)
        loss = case.loss_fn(model(case.x), case.y).sum()
        with backpack(BatchGrad()):
            loss.backward()
        return _take(model, "grad_batch")

    with warnings.catch_warnings(record=True) as caught:  # BackPACK only warns; make it an error
        warnings.simplefilter("always")
        missing = [n for n, g in run().items() if g is None]
    if missing:
        said = next((str(w.message) for w in caught if "extension for Module" in str(w.message)
                     and "LayerNorm" in str(w.message)), None) or \
            next((str(w.message) for w in caught if "extension for Module" in str(w.message)), "")
        raise RuntimeError(f"no grad_batch for {len(missing)} parameters (e.g. {missing[0]}); "
                           f"BackPACK: {said}")
    return Prepared(run, lambda r: r, lambda r: _bytes(r.values()),
                    note="extend(model), BatchGrad on the summed loss")


def _vmap_fn(model: torch.nn.Module, loss_fn):
    """``vmap(grad(...))`` over the batch, written directly (also the reference)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_one(p, x, y):
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).squeeze(0)
    g = vmap(grad(loss_one), in_dims=(None, 0, 0))
    return lambda x, y: g(params, x, y)


def _func_vmap(case: Case) -> Prepared:
    fn = _vmap_fn(_fresh(case), case.loss_fn)
    return Prepared(lambda: fn(case.x, case.y), lambda r: r, lambda r: _bytes(r.values()),
                    note="vmap(grad(functional_call)), no chunking")


def _naive(case: Case) -> Prepared:
    model, b = _fresh(case), case.naive_batch
    names, params = zip(*model.named_parameters())

    def run():
        rows = [torch.autograd.grad(case.loss_fn(model(case.x[i:i + 1]), case.y[i:i + 1]).sum(),
                                    params) for i in range(b)]
        return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}
    return Prepared(run, lambda r: r, lambda r: _bytes(r.values()), rows=b,
                    note=f"loop over {b} of {case.batch_size} examples; time scaled by "
                         f"{case.batch_size}/{b}, memory and result size for {b} examples",
                    extra={"time_scale": case.batch_size / b})


CONTESTANTS: dict[str, tuple[str, Callable[[Case], Prepared]]] = {
    "plain": ("plain fwd+bwd (floor)", _plain),
    "hooks": ("gradmeta collect_gradients (hooks)", _hooks),
    "gm_func": ("gradmeta per_example_grads (torch.func)", _gm_func),
    "opacus": ("Opacus GradSampleModule", _opacus),
    "backpack": ("BackPACK BatchGrad", _backpack),
    "func_vmap": ("torch.func vmap(grad), direct", _func_vmap),
    "naive": ("naive per-example loop", _naive),
}


# ----------------------------------------------------------------------------- checks
def max_rel_err(case: Case, got: Grads, kind: str, rows: int | None, chunk: int = 32) -> dict:
    """Relative L2 error against the ``torch.func`` reference (computed in chunks).

    ``per_example``: max over examples b of ||g_b - r_b|| / ||r_b||, norms over all compared
    parameters; ``mean``: the same for the batch-mean gradient.
    """
    ref_fn = _vmap_fn(case.model, case.loss_fn)
    names = [n for n, _ in case.model.named_parameters() if n in got]
    missing = [n for n, _ in case.model.named_parameters() if n not in got]
    n_rows = rows or case.batch_size
    errs, num, den = [], 0.0, 0.0
    mean_acc = {n: 0.0 for n in names}
    with torch.no_grad():
        for s in range(0, n_rows, chunk):
            e = min(s + chunk, n_rows)
            ref = ref_fn(case.x[s:e], case.y[s:e])
            if kind == "mean":
                for n in names:
                    mean_acc[n] = mean_acc[n] + ref[n].double().sum(0)
                continue
            d2 = sum(((got[n][s:e].double() - ref[n].double()) ** 2).flatten(1).sum(1) for n in names)
            r2 = sum((ref[n].double() ** 2).flatten(1).sum(1) for n in names)
            errs.append((d2.sqrt() / r2.sqrt().clamp_min(1e-300)).max().item())
        if kind == "mean":
            for n in names:
                m = mean_acc[n] / n_rows
                num += ((got[n].double() - m) ** 2).sum().item()
                den += (m ** 2).sum().item()
            errs.append((num / max(den, 1e-300)) ** 0.5)
    return {"max_rel_err": max(errs), "missing_params": missing}


# ----------------------------------------------------------------------------- measuring
def measure_one(name: str, case_name: str, quick: bool, device: str) -> dict:
    """Peak memory of one full-batch call in this fresh process (the ``--one`` mode)."""
    case = make_case(case_name, quick, device)
    # Warm up on 2 examples so that one-time library buffers (functorch, oneDNN) are not counted.
    small = dataclasses.replace(case, x=case.x[:2], y=case.y[:2], naive_batch=1)
    CONTESTANTS[name][1](small).run()
    prep = CONTESTANTS[name][1](case)
    gc.collect()
    result, peak, how = peak_memory(prep.run, device)
    return {"peak_mem_bytes": int(peak), "result_bytes": int(prep.nbytes(result)), "mem_method": how}


def memory_subprocess(name: str, case_name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--model", case_name,
           "--threads", str(args.threads), "--device", args.device] + (["--quick"] if args.quick else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"mem_error": f"memory probe exited {p.returncode}: {tail}"[:300]}
    return json.loads(lines[-1])


def run_case(case: Case, names: list[str], args) -> list[dict]:
    """Time, check and (optionally) memory-probe every contestant on one case."""
    rows, preps, n_calls = {}, {}, {}
    for name in names:
        label = CONTESTANTS[name][0]
        rows[name] = {"contestant": name, "label": label}
        try:
            preps[name] = CONTESTANTS[name][1](case)
            rows[name]["note"] = preps[name].note
            for w in range(args.warmup):
                t0 = time.perf_counter()
                result = preps[name].run()
                sync(args.device)
            # Fast calls get more timed calls (up to --max-repeats, about --budget seconds each).
            n_calls[name] = max(args.repeats, min(args.max_repeats,
                                                  int(args.budget / (time.perf_counter() - t0))))
            rows[name].update(max_rel_err(case, preps[name].grads(result), preps[name].kind,
                                          preps[name].rows))
            if rows[name]["missing_params"]:
                rows[name]["note"] += f"; not compared: {', '.join(rows[name]['missing_params'])}"
            rows[name]["result_bytes"] = int(preps[name].nbytes(result))
            del result
        except Exception as e:  # record why a peer cannot run this model; keep going
            rows[name]["error"] = error_text(e)
            preps.pop(name, None)
        gc.collect()
    times = {n: [] for n in preps}
    for r in range(max(n_calls.values(), default=0)):
        for name, prep in preps.items():
            if r >= n_calls[name]:
                continue
            gc.collect()
            sync(args.device)
            t0 = time.perf_counter()
            result = prep.run()
            sync(args.device)
            times[name].append((time.perf_counter() - t0) * prep.extra.get("time_scale", 1.0))
            del result
    floor = statistics.median(times["plain"]) if times.get("plain") else None
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name].update(median_s=med, times_s=ts, ratio=med / floor if floor else None)
    if args.memory:
        for name in names:
            if "error" not in rows[name]:
                mem = memory_subprocess(name, case.name, args)
                mem.pop("result_bytes", None)  # already measured in-process
                rows[name].update(mem)
    print(f"[{case.name}] " + ", ".join(f"{n}: {r.get('ratio', float('nan')):.2f}x"
                                        if r.get("ratio") else f"{n}: failed"
                                        for n, r in rows.items()), file=sys.stderr)
    return [rows[n] for n in names]


# ----------------------------------------------------------------------------- output
FULL_ROUTES = ("gm_func", "opacus", "backpack", "func_vmap")


def summary(cases: list[dict]) -> dict:
    """Headline ratios: time of each contestant over plain; memory of the leanest full
    per-example route over the gradmeta factors (result size and measured peak)."""
    out = {}
    for c in cases:
        r = {row["contestant"]: row for row in c["results"]}
        for n, row in r.items():
            if n != "plain" and row.get("ratio") is not None:
                out[f"{c['name']}: {n} time / plain"] = row["ratio"]
        h = r.get("hooks", {})
        for key, what in (("result_bytes", "result size"), ("peak_mem_bytes", "peak memory")):
            full = [r[n][key] for n in FULL_ROUTES if r.get(n, {}).get(key)]
            if h.get(key) and full:
                out[f"{c['name']}: {what}, leanest full per-example route / hooks"] = min(full) / h[key]
    return out


COLUMNS = [
    {"key": "label", "header": "contestant"},
    {"key": "median_s", "header": "median time", "format": "ms"},
    {"key": "ratio", "header": "× plain", "format": "ratio"},
    {"key": "peak_mem_bytes", "header": "peak memory", "format": "bytes"},
    {"key": "result_bytes", "header": "result size", "format": "bytes"},
    {"key": "max_rel_err", "header": "max rel. err", "format": "sci"},
    {"key": "note", "header": "notes"},
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (smoke test)")
    p.add_argument("--models", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--contestants", nargs="+", default=list(CONTESTANTS), choices=list(CONTESTANTS))
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 7; quick 2)")
    p.add_argument("--max-repeats", type=int, default=None,
                   help="cap on timed calls for fast contestants (default 41; quick 2)")
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds of timed calls per contestant and case that fast ones may use")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the per-contestant memory subprocesses")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--one", choices=list(CONTESTANTS), help="memory probe of one contestant")
    p.add_argument("--model", choices=CASES, help="the case for --one")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, BackPACK
    if args.one:
        print(json.dumps(measure_one(args.one, args.model or "mlp_b128", args.quick, args.device)))
        return 0
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.max_repeats = max(args.repeats, args.max_repeats or (args.repeats if args.quick else 41))
    args.warmup = max(args.warmup, 1)  # the warm-up result is the one checked
    if "plain" not in args.contestants:
        args.contestants.insert(0, "plain")
    env = environment(args.device, ("opacus", "backpack-for-pytorch", "gradmeta"))
    cases = []
    for name in args.models:
        case = make_case(name, args.quick, args.device)
        cases.append({"name": name, "description": case.description,
                      "batch_size": case.batch_size,
                      "results": run_case(case, args.contestants, args)})
    data = {
        "benchmark": "grads", "title": "Per-example gradients: time and memory",
        "environment": env,
        "settings": {"quick": args.quick, "repeats": args.repeats, "max_repeats": args.max_repeats,
                     "budget_s": args.budget, "warmup": args.warmup,
                     "threads": args.threads, "dtype": "float32", "memory": args.memory},
        "notes": [
            "Random data (inputs ~ N(0,1), random labels / tokens): timings do not depend on values.",
            f"Time: median of at least {args.repeats} calls after {args.warmup} warm-up call(s) "
            f"(fast contestants: more, up to {args.max_repeats} or about {args.budget:g} s), "
            "interleaved round-robin in one process, each contestant on its own copy of the model; "
            "× plain = median / median of a plain forward+backward of the mean loss.",
            "Naive loop: runs a few examples, its time is scaled to the full batch.",
            "Peak memory: a fresh subprocess per contestant, warmed up on 2 examples (so one-time "
            "library buffers are not counted), then one call on the full batch: peak minus the "
            "level right before the call (CPU: resident set, VmHWM after clear_refs; CUDA: "
            "max_memory_allocated).",
            "Result size: analytic bytes of what the call returns: factors A and Δ for gradmeta "
            "hooks, full per-example gradients for the per-example routes, parameter gradients "
            "for plain.",
            "max rel. err: max over examples b of ||g_b − r_b|| / ||r_b|| over all parameters, "
            "r = torch.func vmap(grad) reference in the same dtype (plain: the mean gradient).",
        ],
        "columns": COLUMNS, "cases": cases,
    }
    data["summary"] = summary(cases)
    js, md = write_results(data, args.out, "grads")
    print(f"wrote {js} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
