"""GradMetaNet on real MLP gradient sets: exact equivariance (float64, 1e-10), data-order
invariance, sensitivity to uncoupled permutations, any batch size, batching over sets."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradmeta.nn import GradMetaNet, symmetry_spec

TOL = 1e-10
CONFIGS = [(ro, v, wa) for v in ("base", "plusplus") for ro, wa in
           (("invariant", False), ("neuron", False), ("weight", False), ("weight", True))]


def make_net(model, readout, variant, weight_aware, seed=0, product="gelu", neuron_attention="softmax"):
    torch.manual_seed(seed)
    return GradMetaNet.for_model(model, readout=readout, out_dim=2 if readout != "weight" else 1,
                                 variant=variant, weight_aware=weight_aware, channels=8,
                                 set_layers=2, neuron_layers=1, heads=2, product=product,
                                 neuron_attention=neuron_attention).double()


def run(net, model, gs):
    return net(gs, params=dict(model.named_parameters()) if net.weight_aware else None)


def as_dict(out):
    return out if isinstance(out, dict) else {"out": out}


def check_equivariance(refs, widths, batch, readout, variant, weight_aware, seed, product="gelu",
                       neuron_attention="softmax"):
    rng = torch.Generator().manual_seed(seed)
    model, x, y = refs.mlp_case(widths, batch, seed)
    spec = symmetry_spec(model)
    net = make_net(model, readout, variant, weight_aware, seed, product, neuron_attention)
    out = run(net, model, refs.collect(model, x, y))
    perms = refs.nontrivial_perms(spec, rng)
    pmodel = refs.permuted_model(model, spec, perms)
    out_p = run(net, pmodel, refs.collect(pmodel, x, y))
    expect = out if readout == "invariant" else refs.permute_output(spec, out, perms)
    refs.assert_close_dict(as_dict(out_p), as_dict(expect), TOL)
    # data order: shuffle the examples, recompute
    order = torch.randperm(batch, generator=rng)
    out_s = run(net, model, refs.collect(model, x[order], y[order]))
    refs.assert_close_dict(as_dict(out_s), as_dict(out), TOL)
    return net, model, x, y, out


@pytest.mark.parametrize("readout,variant,weight_aware", CONFIGS)
def test_equivariance_real_mlp(refs, readout, variant, weight_aware):
    check_equivariance(refs, [5, 7, 6, 3], 9, readout, variant, weight_aware, seed=3)


@pytest.mark.parametrize("readout,weight_aware", [("invariant", False), ("weight", False), ("weight", True)])
def test_linear_neuron_attention_equivariance_real_mlp(refs, readout, weight_aware):
    """GradMetaNet++ with linear attention across neurons: permuting hidden neurons of the real
    network and recomputing its gradient set permutes the output; shuffling the data leaves it."""
    for widths, batch, seed in (([5, 7, 6, 3], 9, 3), ([4, 3, 5, 2, 3], 4, 7)):
        check_equivariance(refs, widths, batch, readout, "plusplus", weight_aware, seed, neuron_attention="linear")


@pytest.mark.parametrize("variant", ["base", "plusplus"])
@pytest.mark.parametrize("weight_aware", [False, True])
def test_bilinear_readout_equivariance_real_mlp(refs, variant, weight_aware):
    """The bilinear per-weight readout: permuting hidden neurons and recomputing the gradient set
    permutes the output like the parameters; shuffling the data leaves it unchanged."""
    for widths, batch, seed in (([5, 7, 6, 3], 9, 3), ([4, 3, 5, 2, 3], 4, 7)):
        check_equivariance(refs, widths, batch, "weight", variant, weight_aware, seed, product="bilinear")


def test_bilinear_products_are_means_of_per_example_products(refs):
    """With U picking δ and V picking a (channels 1 and 0 of an MLP's raw neuron features), the
    bilinear channel is mean_b δ_b[i] a_b[j], the mean gradient (and, for a bias, with V the
    constant 1, mean_b δ_b[i]); checked against per-example gradients from a loop over the data."""
    import gradmeta as gm
    from gradmeta.models import classification_loss
    from gradmeta.nn import NeuronLayout
    from gradmeta.nn._layers import ProductReadout
    model, x, y = refs.mlp_case([5, 7, 6, 3], 9, 1)
    spec = symmetry_spec(model)
    layout = NeuronLayout(spec)
    feats = layout.features(refs.collect(model, x, y))            # {space: (B, 1, n, 4)}: a, δ, has_a, has_δ
    h = torch.cat([feats[s.name] for s in spec.spaces], -2).flatten(0, 1).unsqueeze(0)  # (1, B, N, 4)
    ro = ProductReadout(spec, layout.offsets, 4, 3, product="bilinear").double()
    with torch.no_grad():
        for lin in (ro.u2, ro.v2, ro.u1, ro.v1):
            lin.weight.zero_(), lin.bias.zero_()
        ro.u2.weight[0, 1] = ro.v2.weight[0, 0] = 1.0             # channel 0: δ_i · a_j
        ro.u1.weight[0, 1] = ro.v1.bias[0] = 1.0                  # channel 0: δ_i · 1
    z = ro.products(h)
    naive = {}
    for b in range(len(x)):                                      # slow reference: one example at a time
        model.zero_grad()
        classification_loss(model(x[b:b + 1]), y[b:b + 1]).sum().backward()
        for n, p in model.named_parameters():
            naive[n] = naive.get(n, 0) + p.grad / len(x)
    for n, _ in spec.params:
        assert z[n].shape == (1, *naive[n].shape, 3)
        torch.testing.assert_close(z[n][0, ..., 0], naive[n], atol=1e-12, rtol=0)
        assert z[n][0, ..., 1:].abs().max() == 0
    torch.testing.assert_close(z["2.weight"][0, ..., 0], gm.collect_gradients(
        model, classification_loss, x, y).mean_grad()["2.weight"], atol=1e-12, rtol=0)
    # without a data axis: S = 1, the plain product of the two sides
    z1 = ro.products(h[:, 0])
    torch.testing.assert_close(z1["0.weight"][0, ..., 0], torch.outer(h[0, 0, 5:12, 1], h[0, 0, :5, 0]))


def test_bilinear_readout_trains_and_rejects_bad_options(refs):
    model, x, y = refs.mlp_case([4, 6, 3], 5, 0)
    gs = refs.collect(model, x, y)
    for variant in ("base", "plusplus"):
        net = make_net(model, "weight", variant, False, product="bilinear")
        sum((v ** 2).sum() for v in net(gs).values()).backward()
        assert all(p.grad is not None for n, p in net.named_parameters() if n.startswith("head."))
    with pytest.raises(ValueError, match="product"):
        make_net(model, "weight", "base", False, product="bogus")
    with pytest.raises(ValueError, match="readout='weight'"):
        make_net(model, "invariant", "base", False, product="bilinear")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(widths=st.lists(st.integers(2, 6), min_size=3, max_size=5), batch=st.integers(1, 6),
       cfg=st.sampled_from(CONFIGS), seed=st.integers(0, 10_000))
def test_equivariance_hypothesis(refs, widths, batch, cfg, seed):
    check_equivariance(refs, widths, batch, *cfg, seed)


@pytest.mark.parametrize("variant", ["base", "plusplus"])
def test_uncoupled_permutations_change_output(refs, variant):
    """Permuting the a-channel of a hidden level without its δ, or the data order of one layer's
    activations without its backprops, is not a symmetry: the output must change."""
    model, x, y = refs.mlp_case([5, 7, 6, 3], 8, 0)
    gs = refs.collect(model, x, y)
    for readout in ("invariant", "weight"):
        net = make_net(model, readout, variant, False)
        out = as_dict(net(gs))
        a = gs["2"].activations                       # indexed by level-1 neurons
        perm = torch.roll(torch.arange(a.shape[-1]), 1)
        bad_neuron = refs.replace_factors(gs, "2", activations=a[..., perm])
        bad_data = refs.replace_factors(gs, "2", activations=a[torch.roll(torch.arange(8), 1)])
        for bad in (bad_neuron, bad_data):
            o = as_dict(net(bad))
            assert max((o[k] - out[k]).abs().max().item() for k in out) > 1e-6


@pytest.mark.parametrize("variant", ["base", "plusplus"])
def test_any_batch_size_and_list_batching(refs, variant):
    model, x, y = refs.mlp_case([4, 6, 3], 17, 0)
    net = make_net(model, "weight", variant, True)
    params = dict(model.named_parameters())
    sets = [refs.collect(model, x[:b], y[:b]) for b in (1, 5, 17)]
    singles = [net(s, params=params) for s in sets]
    assert all(o["0.weight"].shape == (6, 4) for o in singles)
    batched = net(sets, params=params)                       # different B: one by one
    same = net([sets[1], sets[1]], params=[params, params])  # same B: one stacked pass
    for k in singles[0]:
        assert torch.allclose(batched[k], torch.stack([o[k] for o in singles]), atol=TOL)
        assert torch.allclose(same[k][1], singles[1][k], atol=TOL)
    inv = make_net(model, "invariant", variant, False)
    assert inv(sets).shape == (3, 2) and inv(sets[0]).shape == (2,)


def test_weight_aware_uses_weights(refs):
    model, x, y = refs.mlp_case([4, 6, 3], 5, 0)
    gs = refs.collect(model, x, y)
    net = make_net(model, "weight", "base", True)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = net(gs, params=params)
    params["2.weight"][0, 0] += 1.0
    out2 = net(gs, params=params)
    assert (out["2.weight"][0, 0] - out2["2.weight"][0, 0]).abs() > 1e-8
    with pytest.raises(ValueError, match="weight-aware"):
        net(gs)


def test_bad_arguments():
    from gradmeta.models import mlp
    with pytest.raises(ValueError, match="readout"):
        GradMetaNet.for_model(mlp([2, 3, 2]), readout="bogus")
    with pytest.raises(ValueError, match="variant"):
        GradMetaNet.for_model(mlp([2, 3, 2]), variant="bogus")


def test_chunked_per_datum_readout_matches(refs, monkeypatch):
    import gradmeta.nn._layers as layers
    model, x, y = refs.mlp_case([4, 6, 3], 9, 0)
    gs = refs.collect(model, x, y)
    net = make_net(model, "weight", "plusplus", True)
    params = dict(model.named_parameters())

    def value_and_grad():
        net.zero_grad()
        out = net(gs, params=params)
        sum((v ** 2).sum() for v in out.values()).backward()
        return out, [p.grad.clone() for p in net.parameters() if p.grad is not None]

    full, gfull = value_and_grad()
    monkeypatch.setattr(layers, "_CHUNK_ELEMENTS", 50)
    chunked, gchunk = value_and_grad()
    refs.assert_close_dict(chunked, full, 1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(gchunk, gfull))
