"""Peak memory of one GradMetaNet++ forward and backward: the fused CPU attention kernel (what
``gradmeta.nn`` uses when an autograd graph is recorded) vs the explicit form (matrix products and
a softmax, used for graph-free steps under ``vmap``), each in its own process (peak RSS).

    python benchmarks/gmn_attention_memory.py            # -> benchmarks/results/gmn_attention_memory.json
    python benchmarks/gmn_attention_memory.py --examples 4 --out DIR   # smaller
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def measure(mode: str, examples: int) -> dict:
    """One forward and backward of GradMetaNet++ (4 blocks, 32 channels, weight readout) on the
    gradient set of ``examples`` examples of an MLP 784-256-128-10; peak RSS of this process."""
    import torch
    import torch.nn.functional as F

    import gradmeta as gm
    import gradmeta.nn as gnn
    import gradmeta.nn._layers as layers
    from gradmeta.models import classification_loss, mlp

    if mode == "explicit":  # force the explicit form even though a graph is recorded
        layers.attention = layers.explicit_attention
    else:
        layers.attention = lambda q, k, v, scale=None: F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = mlp([784, 256, 128, 10])
    x, y = torch.randn(examples, 784), torch.randint(0, 10, (examples,))
    gs = gm.collect_gradients(model, classification_loss, x, y)
    net = gnn.GradMetaNet(gnn.symmetry_spec(model), readout="weight", variant="plusplus", channels=32, set_layers=4)
    t0 = time.perf_counter()
    out = net(gs)
    sum(v.square().sum() for v in out.values()).backward()
    return {"mode": mode, "examples": examples, "seconds": time.perf_counter() - t0,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--child", choices=["fused", "explicit"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.examples)))
        return 0
    from _common import environment

    rows = []
    for mode in ("fused", "explicit"):
        p = subprocess.run([sys.executable, __file__, "--child", mode, "--examples", str(args.examples)],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"{mode:9s} peak RSS {rows[-1]['peak_rss_gib']:.2f} GiB, {rows[-1]['seconds']:.1f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gmn_attention_memory.json").write_text(json.dumps(
        {"benchmark": "gmn_attention_memory", "environment": environment("cpu"), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
