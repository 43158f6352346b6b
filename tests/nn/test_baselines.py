"""Baselines: shapes, any batch size, and the symmetries each one claims."""
import pytest
import torch

from gradmeta.nn import AveragedGradientNet, FlatFactorMLP, PerParamDeepSets, symmetry_spec


@pytest.mark.parametrize("weight_aware", [False, True])
def test_averaged_gradient_net_equivariant(refs, rng, weight_aware):
    model, x, y = refs.mlp_case([5, 7, 6, 3], 9, 0)
    spec = symmetry_spec(model)
    torch.manual_seed(0)
    net = AveragedGradientNet.for_model(model, weight_aware=weight_aware, channels=8).double()
    kw = lambda m: {"params": dict(m.named_parameters())} if weight_aware else {}  # noqa: E731
    out = net(refs.collect(model, x, y), **kw(model))
    perms = refs.nontrivial_perms(spec, rng)
    pm = refs.permuted_model(model, spec, perms)
    refs.assert_close_dict(net(refs.collect(pm, x, y), **kw(pm)), spec.permute(out, perms))
    # it only sees the mean gradient: a dict of mean gradients gives the same answer
    refs.assert_close_dict(net(refs.collect(model, x, y).mean_grad(), **kw(model)), out)
    inv = AveragedGradientNet.for_model(model, readout="invariant", out_dim=3, channels=8).double()
    assert inv([refs.collect(model, x, y)] * 2).shape == (2, 3)


def test_per_param_deepsets(refs):
    model, x, y = refs.mlp_case([4, 6, 3], 7, 0)
    torch.manual_seed(0)
    net = PerParamDeepSets(hidden=8, weight_aware=True).double()
    params = dict(model.named_parameters())
    out = net(refs.collect(model, x, y), params=params)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in params.items()}
    order = torch.randperm(7)
    refs.assert_close_dict(net(refs.collect(model, x[order], y[order]), params=params), out)
    assert net([refs.collect(model, x[:2], y[:2]), refs.collect(model, x, y)], params=params)["0.weight"].shape == (2, 6, 4)


def test_flat_factor_mlp(refs):
    model, x, y = refs.mlp_case([4, 6, 3], 7, 0)
    torch.manual_seed(0)
    net = FlatFactorMLP.for_model(model, readout="weight", hidden=16).double()
    out = net(refs.collect(model, x[:3], y[:3]))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in model.named_parameters()}
    inv = FlatFactorMLP.for_model(model, out_dim=2, hidden=16).double()
    assert inv([refs.collect(model, x, y), refs.collect(model, x[:1], y[:1])]).shape == (2, 2)
