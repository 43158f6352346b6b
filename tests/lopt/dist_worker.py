"""Worker for test_distributed: run under ``torchrun --nproc_per_node=N``; or import ``pes_run``."""
import sys

import torch


def pes_run(comm=None, iterations: int = 2):
    """Two PES truncations on a small digits MLP; returns (meta-gradients, final state leaves, infos)."""
    from gradmeta.lopt import PES, PerParamMLP, digits_mlp

    torch.set_num_threads(1)
    task = digits_mlp(hidden=[8], batch_size=16)
    lo = PerParamMLP(hidden=8)
    meta = lo.init_meta(0)
    pes = PES(task, lo, particles=8, truncation=3, horizon=6, sigma=0.01, comm=comm)
    gen = torch.Generator().manual_seed(0)
    state = pes.init(meta, gen)
    grads, infos = [], []
    for _ in range(iterations):
        g, state, info = pes.grad(meta, state, gen)
        grads.append(g)
        infos.append(info)
    return grads, pes.to_leaves(state), infos


if __name__ == "__main__":
    from gradmeta.lopt import comm_from_env

    comm = comm_from_env()
    grads, leaves, infos = pes_run(comm)
    torch.save({"grads": grads, "leaves": leaves, "infos": infos, "world": comm.world_size},
               f"{sys.argv[1]}.rank{comm.rank}.pt")
    torch.distributed.destroy_process_group()
