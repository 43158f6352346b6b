"""Training curves: the vectorised sweep equals a plain loop; step reduction on hand-made curves."""
import torch
from torch.utils import _pytree as pytree

from gradmeta.lopt import PerParamMLP, learned_curves, step_reduction, train_curves


class _Looped(PerParamMLP):
    """The same rule, but its runs are stepped one at a time (as rules that are not vmappable are)."""

    def map(self, fn, in_dims):
        def looped(*args):
            n = next(pytree.tree_leaves(a)[0].shape[d] for a, d in zip(args, in_dims) if d is not None)
            outs = [fn(*(pytree.tree_map(lambda x: x[i], a) for a in args)) for i in range(n)]
            return pytree.tree_map(lambda *xs: torch.stack(xs), *outs)
        return looped


def test_vectorised_curves_equal_the_seed_by_seed_loop(small_digits):
    lo = PerParamMLP(hidden=8)
    meta = lo.init_meta(0)
    meta["w2"] = 0.1 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    seeds = [3, 4]
    fast = train_curves(small_digits, lambda h: lo.bind(meta), torch.zeros(1), seeds, steps=7, eval_every=3)
    rule = learned_curves(small_digits, lo, meta, seeds, steps=7, eval_every=3)
    for k in fast:  # the learned-rule path is the same computation as the sweep with H = 1
        assert torch.equal(rule[k], fast[k]), k
    slow = learned_curves(small_digits, _Looped(hidden=8), meta, seeds, steps=7, eval_every=3)
    assert fast["eval_steps"].tolist() == slow["eval_steps"].tolist() == [0, 3, 6, 7]
    for k in ("test_loss", "train_loss"):
        assert fast[k].shape == slow[k].shape
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-5)
    assert torch.equal(fast["skipped"], slow["skipped"])


def test_step_reduction_counts_steps_to_the_reference_best():
    steps = torch.tensor([0, 10, 20, 30])
    ref = torch.tensor([[3.0, 2.0, 1.0, 1.5]])          # best 1.0 at step 20
    faster = torch.tensor([[3.0, 0.9, 0.8, 0.8]])        # reaches 1.0 at step 10 -> 2x
    never = torch.tensor([[3.0, 2.0, 1.1, float("nan")]])
    assert step_reduction(ref, faster, steps).tolist() == [2.0]
    assert step_reduction(ref, never, steps).tolist() == [0.0]
