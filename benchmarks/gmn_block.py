"""One GradMetaNet++ attention block, and the kernels inside it, at a learned optimizer's sizes.

The tensors of a PES step of the digits MLP 64-32-10 (106 neurons) under ``vmap`` over 16
particles: ``(16, S, 106, 8)`` for ``S`` = 16 or 8 examples per gradient set, 8 channels, 1 head,
no autograd graph. Rows, timed side by side in one process (interleaved rounds, medians):

* the block with softmax and with linear attention across neurons (``neuron_attention``);
* the layer normalisation of its 8-channel rows: ``F.layer_norm`` against the two matrix
  products the block uses (``gradmeta.nn._layers._normalize``);
* a softmax over 8 or 16 scores, along the last axis and along the first of the two score axes
  (what the block's attention across the data uses).

    python benchmarks/gmn_block.py        # -> benchmarks/results/gmn_block.{json,md}
    python benchmarks/gmn_block.py --quick --out DIR
    python benchmarks/gmn_block.py --allocator default  # glibc's default -> gmn_block_default_allocator.*

By default the process keeps freed CPU memory for reuse (``gradmeta.keep_freed_cpu_memory()``, as
the ``gradmeta`` command and the PES benchmark do). With glibc's default allocator, fresh tensors of
a few MiB fault their pages in until glibc raises its threshold: the linear-attention block at 16
examples measured 7.2–17.1 ms over five such runs, against 7.2–7.9 ms over three with freed memory
kept (2-core CPU, 1 thread).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def contestants(S: int) -> list[tuple[str, callable, str]]:
    """``(label, fn, group)``: the ratio of each row is to the first row of its group."""
    from gradmeta.nn._layers import AttentionBlock, _normalize

    x = torch.randn(16, S, 106, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    soft, lin = AttentionBlock(8, 1, "softmax"), AttentionBlock(8, 1, "linear")
    scores = torch.randn(16 * 106, S, S, generator=torch.Generator().manual_seed(1))
    return [(f"block, softmax attention across neurons, S={S}", lambda: soft(x), "block"),
            (f"block, linear attention across neurons, S={S}", lambda: lin(x), "block"),
            ("layer norm of (16, S, 106, 8): F.layer_norm", lambda: F.layer_norm(x, (8,)), "norm"),
            ("layer norm: two products with a (8, 1) column", lambda: _normalize(x, 1e-5), "norm"),
            (f"softmax of (1696, {S}, {S}) scores, last axis", lambda: torch.softmax(scores, -1), "softmax"),
            (f"softmax of (1696, {S}, {S}) scores, first score axis", lambda: torch.softmax(scores, -2), "softmax")]


def run_case(S: int, repeats: int) -> dict:
    rows = contestants(S)
    times = {label: [] for label, _, _ in rows}
    with torch.no_grad():
        for _ in range(3):  # warm-up
            for _, fn, _ in rows:
                fn()
        for _ in range(repeats):
            for label, fn, _ in rows:
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
    first, results = {}, []
    for label, _, group in rows:
        med = statistics.median(times[label])
        first.setdefault(group, med)
        results.append({"label": label, "time_s": med, "ratio": med / first[group]})
    return {"name": f"S{S}", "description": f"{S} examples per gradient set: (16, {S}, 106, 8) tensors; "
            f"median of {repeats} interleaved rounds; ratio to the first row of its group", "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--threads", type=int, default=1)
    from _common import add_allocator_option, environment, set_allocator, write_results

    add_allocator_option(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    suffix = set_allocator(args.allocator)

    repeats = 3 if args.quick else 30
    data = {"benchmark": "gmn_block", "title": "A GradMetaNet++ attention block and its kernels (CPU, no autograd)",
            "environment": environment("cpu"),
            "settings": {"threads": args.threads, "quick": args.quick, "allocator": args.allocator},
            "columns": [{"key": "label", "header": "operation"}, {"key": "time_s", "header": "time", "format": "ms"},
                        {"key": "ratio", "header": "vs first of its kind", "format": "ratio"}],
            "cases": [run_case(S, repeats) for S in (16, 8)]}
    js, md = write_results(data, args.out, "gmn_block" + suffix)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
