"""Truncated backpropagation through the unrolls of every learned rule (the gradient-set rules read the
per-example factors in their own step): the meta-gradient against central finite differences of the
same truncated meta-loss, in float64, on digits (blank pixels give entries with no gradient)."""
import pytest
import torch
from torch.utils import _pytree as pytree

from gradmeta.lopt import (GeneralistRule, GradientStatsLO, GradMetaNetLO, PerParamMLP, SupervisedTask, TruncatedBackprop,
                           WeightSpaceLO, digits_mlp, meta_loss, unroll)
from gradmeta.models import classification_loss, mlp

RULES = {
    "gradmetanet, 5 of 12 examples": lambda t: GradMetaNetLO(t, gmn_channels=2, channels=4, hidden=8, examples=5),
    "gradmetanet, weight-aware, gated": lambda t: GradMetaNetLO(t, gmn_channels=2, channels=4, hidden=8,
                                                                weight_aware=True, extra_gate=True),
    "gradmetanet++": lambda t: GradMetaNetLO(t, gmn_channels=2, channels=4, hidden=8, variant="plusplus"),
    "gradmetanet, bilinear readout": lambda t: GradMetaNetLO(t, gmn_channels=2, channels=4, hidden=8,
                                                             product="bilinear"),
    "gradient statistics": lambda t: GradientStatsLO(t, hidden=8, examples=5),
    "weight-space": lambda t: WeightSpaceLO(t, out_channels=2, channels=4, hidden=8),
    "per-parameter MLP": lambda t: PerParamMLP(hidden=8),
    "generalist": lambda t: GeneralistRule(total_steps=9),
    "generalist, distance-based step size": lambda t: GeneralistRule(total_steps=9, lr_free=True),
}


@pytest.fixture(scope="module")
def digits64():
    """Digits MLP 64-6-10 in float64, batch 12."""
    t = digits_mlp(hidden=[6], batch_size=12)
    return SupervisedTask(mlp([64, 6, 10]).double(), classification_loss, t.X.double(), t.y, t.X_test.double(),
                          t.y_test, batch_size=12, name="digits64")


@pytest.mark.parametrize("name", list(RULES))
def test_truncated_backprop_equals_finite_differences(digits64, name):
    lo = RULES[name](digits64)
    gen = torch.Generator().manual_seed(3)
    # away from the initialisation (gates open, the branch's output layers non-zero) and in float64
    meta = {k: (v.double() + 0.2 * torch.randn(v.shape, generator=gen, dtype=torch.float64))
            for k, v in lo.init_meta(0).items()}
    tb = TruncatedBackprop(digits64, lo, particles=2, truncation=3, horizon=9, log_loss=True)
    state = tb.init(meta, torch.Generator().manual_seed(0))
    _, state, _ = tb.grad(meta, state, torch.Generator().manual_seed(1))  # running averages are non-zero
    g, _, info = tb.grad(meta, state, torch.Generator().manual_seed(2))
    assert all(torch.isfinite(v).all() for v in g.values()) and info["skipped"] == 0

    batches = tb._batches(torch.Generator().manual_seed(2))  # the ones tb.grad drew

    def loss(m):  # the same truncated meta-loss, particle by particle, without any autograd
        total = 0.0
        for i in range(2):
            p, s = (pytree.tree_map(lambda x: x[i], t) for t in (state["params"], state["opt_state"]))
            total += meta_loss(unroll(digits64, lo, m, p, s, tuple(b[:, i] for b in batches))[2], log_loss=True)
        return total / 2

    assert float(loss(meta)) == pytest.approx(info["meta_loss"], rel=1e-10)
    for d in range(3):
        v = {k: torch.randn(x.shape, generator=gen, dtype=torch.float64) for k, x in meta.items()}
        ad = float(sum((g[k] * v[k]).sum() for k in meta))
        # central differences at two steps: the clamps of some rules put a kink within 1e-6 of the
        # point in some directions, which only the smaller step steps over; rounding stays ~1e-9
        fd = [float((loss({k: meta[k] + e * v[k] for k in meta}) - loss({k: meta[k] - e * v[k] for k in meta})) / (2 * e))
              for e in (1e-6, 1e-7)]
        assert min(abs(ad - f) - 1e-6 * abs(f) for f in fd) <= 1e-9, (name, d, ad, fd)
    branch = [k for k in meta if k.startswith(f"{getattr(lo, 'prefix', None)}.")]
    assert not branch or any(float(g[k].abs().max()) > 0 for k in branch)  # the branch is reached


def test_the_higher_backend_refuses_a_rule_that_reads_the_gradient_set(digits64):
    with pytest.raises(ValueError, match="GradientStatsLO reads more of the batch.*backend='func'"):
        TruncatedBackprop(digits64, GradientStatsLO(digits64, hidden=8), particles=2, truncation=2, horizon=4,
                          backend="higher")


def test_statistics_have_finite_derivatives_where_float32_gradients_are_tiny():
    """Inputs of 1e-20 give first-layer per-example gradients of ~1e-20 (their squares are subnormal
    in float32): the agreement's exact derivative overflows there; the statistics keep exact values
    and finite derivatives."""
    from gradmeta.grads import functional_factors
    from gradmeta.lopt import gradient_set_statistics

    torch.manual_seed(0)
    model = mlp([4, 5, 3]).requires_grad_(True)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(6, 4) * 1e-20
    x[:, 0] = torch.randn(6)  # one input of normal size: its column's entries are ordinary
    y = torch.randint(0, 3, (6,))
    w = {k: torch.randn(*v.shape, 2) for k, v in params.items()}

    def f(p):
        s = gradient_set_statistics(functional_factors(model, classification_loss, p, x, y), p)
        return sum((s[k] * w[k]).sum() for k in p), s

    g, s = torch.func.grad(f, has_aux=True)(params)
    r = s["0.weight"][..., 0]
    assert ((r > 0) & (r < 1e-15)).any() and (r > 1e-3).any()  # both kinds of entries are there
    assert all(torch.isfinite(v).all() for v in g.values())
    assert any(float(v.abs().max()) > 0 for v in g.values())
