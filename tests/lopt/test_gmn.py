"""The GradMetaNet branch: untrained it is SGD with momentum; PES meta-trains it (particle loop)."""
import pytest
import torch
from torch.func import grad, vmap

from gradmeta.lopt import PES, GradientStatsLO, GradMetaNetLO, PerParamMLP, TruncatedBackprop, WeightSpaceLO


@pytest.mark.parametrize("variant,weight_aware", [("base", False), ("plusplus", False), ("base", True)])
def test_untrained_gradmetanet_lo_equals_per_parameter_lo(small_digits, variant, weight_aware):
    lo = GradMetaNetLO(small_digits, gmn_channels=2, variant=variant, weight_aware=weight_aware, hidden=8, lr=0.1)
    ref = PerParamMLP(hidden=8, lr=0.1)
    meta, ref_meta = lo.init_meta(0), ref.init_meta(0)
    assert any(k.startswith("gmn.") for k in meta) and all(f"mlp.{k}" in meta for k in ref_meta)
    params = small_digits.init(0)
    p_ref, s_ref, s = params, ref.init(params), lo.init(params)
    batches = small_digits.batches(torch.Generator().manual_seed(0), 4)
    for t in range(4):
        batch = tuple(b[t] for b in batches)
        params, s, loss = lo.step(small_digits, meta, params, s, batch)
        g = grad(lambda q: small_digits.loss(q, batch).mean())(p_ref)
        p_ref, s_ref = ref.update(ref_meta, g, s_ref, p_ref)
        for k in params:
            torch.testing.assert_close(params[k], p_ref[k], rtol=1e-5, atol=1e-6)
    # the GradMetaNet readout reaches the update once the MLP's last layer is non-zero
    meta2 = dict(meta)
    meta2["mlp.w2"] = torch.zeros_like(meta["mlp.w2"])
    meta2["mlp.w2"][0, 0] = 1.0
    meta2["mlp.w0"] = torch.zeros_like(meta["mlp.w0"])
    meta2["mlp.w0"][PerParamMLP.n_base_features - 9, 0] = 1.0  # hidden unit 0 reads GradMetaNet channel 0
    meta2["mlp.w1"] = torch.eye(8)
    a, _, _ = lo.step(small_digits, meta2, params, s, batch)
    noise = torch.Generator().manual_seed(1)
    meta3 = dict(meta2, **{k: v + 0.5 * torch.randn(v.shape, generator=noise) for k, v in meta2.items()
                           if k.startswith("gmn.")})
    b, _, _ = lo.step(small_digits, meta3, params, s, batch)
    assert any(not torch.allclose(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls", [GradMetaNetLO, WeightSpaceLO, GradientStatsLO])
def test_a_gated_branch_starts_as_the_per_parameter_lo_of_the_same_seed(small_digits, cls):
    """Gates at zero: any per-parameter part (here a trained-looking one) steps exactly as the
    per-parameter optimizer, whatever the branch's meta-parameters; an open gate changes the step."""
    lo, ref = cls(small_digits, hidden=8, extra_gate=True), PerParamMLP(hidden=8)
    meta, ref_meta = lo.init_meta(2), ref.init_meta(2)
    assert all(torch.equal(meta[f"mlp.{k}"], v) for k, v in ref_meta.items())
    noise = torch.Generator().manual_seed(0)
    meta = {k: v + (0 if k == "mlp.extra_gate" else 0.3) * torch.randn(v.shape, generator=noise)
            for k, v in meta.items()}
    ref_meta = {k: meta[f"mlp.{k}"] for k in ref_meta}
    params = small_digits.init(0)
    s, s_ref, p_ref = lo.init(params), ref.init(params), params
    batches = small_digits.batches(torch.Generator().manual_seed(0), 3)
    for t in range(3):
        batch = tuple(b[t] for b in batches)
        opened = lo.step(small_digits, {**meta, "mlp.extra_gate": torch.ones_like(meta["mlp.extra_gate"])},
                         params, s, batch)[0]
        params, s, _ = lo.step(small_digits, meta, params, s, batch)
        g = grad(lambda q: small_digits.loss(q, batch).mean())(p_ref)
        p_ref, s_ref = ref.update(ref_meta, g, s_ref, p_ref)
        for k in params:
            torch.testing.assert_close(params[k], p_ref[k], rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(opened[k], params[k]) for k in params)


def test_pes_meta_gradient_for_the_gradmetanet_lo(small_digits):
    lo = GradMetaNetLO(small_digits, gmn_channels=2, hidden=8)
    meta = lo.init_meta(0)
    pes = PES(small_digits, lo, particles=2, truncation=2, horizon=4)
    gen = torch.Generator().manual_seed(0)
    state = pes.init(meta, gen)
    g, state, info = pes.grad(meta, state, gen)
    assert set(g) == set(meta) and all(torch.isfinite(v).all() for v in g.values())
    assert info["skipped"] == 0 and int(state["step"]) == 2
    with pytest.raises(ValueError, match="reads more of the batch.*backend='func'"):
        TruncatedBackprop(small_digits, lo, particles=2, truncation=2, horizon=4, backend="higher")


def _permute_hidden(p: dict, perm: torch.Tensor) -> dict:
    """Permute the hidden neurons of a one-hidden-layer MLP's parameter-shaped dict (keys 0.*, 2.*)."""
    return {"0.weight": p["0.weight"][perm], "0.bias": p["0.bias"][perm], "2.weight": p["2.weight"][:, perm],
            "2.bias": p["2.bias"]}


@pytest.mark.parametrize("center", [False, True])
def test_weight_space_lo_untrained_is_sgdm_equivariant_and_vmappable(small_digits, center):
    lo, ref = WeightSpaceLO(small_digits, out_channels=2, hidden=8, center_branch=center), PerParamMLP(hidden=8)
    meta, ref_meta = lo.init_meta(0), ref.init_meta(0)
    assert any(k.startswith("ws.") for k in meta) and all(f"mlp.{k}" in meta for k in ref_meta)
    params = small_digits.init(0)
    batch = tuple(b[0] for b in small_digits.batches(torch.Generator().manual_seed(0), 1))
    g = grad(lambda q: small_digits.loss(q, batch).mean())(params)
    untrained, _ = lo.update(meta, g, lo.init(params), params)
    want, _ = ref.update(ref_meta, g, ref.init(params), params)
    for k in want:
        torch.testing.assert_close(untrained[k], want[k], rtol=1e-6, atol=1e-7)
    # a trained-looking optimizer (random last layer) uses the branch, and stays exactly equivariant
    gen = torch.Generator().manual_seed(1)
    meta = {k: v.double() for k, v in meta.items()}
    meta["mlp.w2"] = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    lo.net.double()
    p64, g64 = ({k: v.double() for k, v in d.items()} for d in (params, g))
    out, _ = lo.update(meta, g64, lo.init(p64), p64)
    perm = torch.randperm(8, generator=gen)
    out_perm, _ = lo.update(meta, _permute_hidden(g64, perm), lo.init(p64), _permute_hidden(p64, perm))
    for k, v in _permute_hidden(out, perm).items():
        torch.testing.assert_close(out_perm[k], v, rtol=1e-10, atol=1e-12)
    branch_off = dict(meta, **{k: torch.zeros_like(v) for k, v in meta.items() if k.startswith("ws.")})
    off, _ = lo.update(branch_off, g64, lo.init(p64), p64)
    assert any(not torch.allclose(off[k], out[k]) for k in out)
    # vmap over particles equals a loop (what the outer trainers rely on)
    stacked = {k: torch.stack([v, v.flip(-1)]) for k, v in p64.items()}
    grads = {k: torch.stack([v, 2 * v]) for k, v in g64.items()}
    batched, _ = vmap(lambda q, d: lo.update(meta, d, lo.init(q), q))(stacked, grads)
    for i in range(2):
        one, _ = lo.update(meta, {k: v[i] for k, v in grads.items()}, lo.init({k: v[i] for k, v in stacked.items()}),
                           {k: v[i] for k, v in stacked.items()})
        for k in one:
            torch.testing.assert_close(batched[k][i], one[k], rtol=1e-10, atol=1e-12)


def test_gradient_set_optimizer_untrained_is_sgd_with_momentum(small_digits):
    from gradmeta.lopt import GradientSetOptimizer
    from gradmeta.models import classification_loss, mlp

    lo = GradMetaNetLO(small_digits, gmn_channels=2, hidden=8, lr=0.1, max_update=10.0)  # clipping off
    torch.manual_seed(0)
    a, b = mlp([64, 8, 10]), mlp([64, 8, 10])
    b.load_state_dict(a.state_dict())
    opt = GradientSetOptimizer(a, classification_loss, lo, lo.init_meta(0))
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    batches = small_digits.batches(torch.Generator().manual_seed(0), 3)
    for t in range(3):
        x, y = batches[0][t], batches[1][t]
        loss = opt.step(lambda: (x, y))
        sgd.zero_grad()
        ref = classification_loss(b(x), y).mean()
        ref.backward()
        sgd.step()
        assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-6)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="returning the batch"):
        opt.step(None)
    with pytest.raises(ValueError, match=r"must return the batch \(inputs, targets\)"):
        opt.step(lambda: classification_loss(a(x), y))


def test_gradient_set_optimizer_state_dict_round_trip(small_digits):
    from gradmeta.lopt import GradientSetOptimizer
    from gradmeta.models import classification_loss, mlp

    lo = GradMetaNetLO(small_digits, gmn_channels=2, hidden=8)
    meta = lo.init_meta(0)
    meta["mlp.w2"] = 0.05 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    a, b = mlp([64, 8, 10]), mlp([64, 8, 10])
    opt_a = GradientSetOptimizer(a, classification_loss, lo, meta)
    batches = small_digits.batches(torch.Generator().manual_seed(0), 4)
    for t in range(2):
        opt_a.step(lambda: (batches[0][t], batches[1][t]))
    b.load_state_dict(a.state_dict())
    opt_b = GradientSetOptimizer(b, classification_loss, lo, meta)
    opt_b.load_state_dict(opt_a.state_dict())
    for t in range(2, 4):
        for opt in (opt_a, opt_b):
            opt.step(lambda: (batches[0][t], batches[1][t]))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
