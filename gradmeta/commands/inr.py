"""``gradmeta inr build-zoo ...``: fit a zoo of SIRENs, optionally sharded under ``torchrun``.

    gradmeta inr build-zoo --source mnist --root data/mnist --out zoo/mnist --resume
    torchrun --nproc_per_node 2 -m gradmeta inr build-zoo --source digits --out zoo/digits --size 16

Every rank fits the shards ``k ≡ rank (mod world_size)`` (gloo process group on CPU); rank 0
writes ``index.json`` after a barrier and prints the throughput of every rank.
"""
from __future__ import annotations

import json

import torch

from gradmeta.cli import positive


__all__ = ["add_parser", "build_zoo_command"]


def add_parser(subparsers) -> None:
    """Register ``gradmeta inr build-zoo`` on an ``argparse`` subparsers object."""
    ap = subparsers.add_parser("inr", help="INR zoos (build-zoo)", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="inr_command", metavar="INR_COMMAND", required=True)
    b = sub.add_parser("build-zoo", help="fit one SIREN per image into safetensors shards + index.json")
    b.add_argument("--source", default="digits", choices=["digits", "mnist", "fashion_mnist", "cifar10"])
    b.add_argument("--root", default=None, help="folder with the local MNIST / CIFAR files")
    b.add_argument("--out", required=True)
    b.add_argument("--size", type=positive(int), default=None)
    b.add_argument("--splits", default="train,test")
    b.add_argument("--limit", type=positive(int), default=None, help="first N images of each split")
    b.add_argument("--steps", type=positive(int), default=500)
    b.add_argument("--lr", type=positive(float), default=1e-3)
    b.add_argument("--shard-size", type=positive(int), default=256)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--resume", action="store_true", help="skip shards already written (default: refit all)")
    b.add_argument("--threads", type=positive(int), default=None, help="torch threads per process")
    b.set_defaults(func=build_zoo_command)


def build_zoo_command(a) -> int:
    """Fit the zoo described by the parsed arguments ``a``; rank 0 prints the throughput as JSON."""
    if a.threads:
        torch.set_num_threads(a.threads)
    from gradmeta._runtime import distributed_context
    from gradmeta.inr import build_zoo, zoo_images

    rank, world = distributed_context()
    images = {s: zoo_images(a.source, s, root=a.root, size=a.size, limit=a.limit) for s in a.splits.split(",")}
    out = build_zoo(a.out, images, shard_size=a.shard_size, steps=a.steps, lr=a.lr, seed=a.seed,
                    resume=a.resume, progress=True, rank=rank, world_size=world,
                    config={"source": a.source, "size": a.size, "limit": a.limit})
    rates = [None] * world
    if world > 1:
        import torch.distributed as dist
        dist.all_gather_object(rates, {k: out[k] for k in ("fitted", "seconds", "inrs_per_s")})
    else:
        rates = [{k: out[k] for k in ("fitted", "seconds", "inrs_per_s")}]
    if rank == 0:
        print(json.dumps({"ranks": rates, "shards": len(out["index"]["shards"])}))
    return 0
