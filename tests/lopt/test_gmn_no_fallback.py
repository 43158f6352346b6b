"""A PES iteration of the GradMetaNet optimizers runs fully batched under ``vmap``: the number of
operations it runs does not grow with the number of particles (an operation without a batching
rule would run once per particle)."""
import pytest
import torch
from torch.profiler import profile

from gradmeta.lopt import PES, GradMetaNetLO


def _ops_per_iteration(task, lo, particles):
    meta = lo.init_meta(0)
    pes = PES(task, lo, particles=particles, truncation=2, horizon=100)
    gen = torch.Generator().manual_seed(0)
    state = pes.init(meta, gen)
    pes.grad(meta, state, gen)  # warm-up (first-call caches)
    with profile() as prof:
        grad, _, _ = pes.grad(meta, state, gen)
    assert all(torch.isfinite(g).all() for g in grad.values())
    assert any(g.abs().sum() > 0 for k, g in grad.items() if k.startswith("gmn."))
    return sum(e.count for e in prof.key_averages())


@pytest.mark.parametrize("variant,kwargs", [("plusplus", {"examples": 8, "layers": 2}),
                                            ("plusplus", {"heads": 2, "channels": 4, "layers": 1}),
                                            ("base", {"examples": 8})])
def test_pes_iteration_ops_do_not_grow_with_particles(small_digits, variant, kwargs):
    lo = GradMetaNetLO(small_digits, variant=variant, **kwargs)
    assert _ops_per_iteration(small_digits, lo, 2) == _ops_per_iteration(small_digits, lo, 6)
