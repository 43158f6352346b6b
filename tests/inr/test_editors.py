"""Editors: exact equivariance (float64) to the hidden-neuron permutations of the input INR."""
import pytest
import torch

import gradmeta.inr as inr


@pytest.fixture(scope="module")
def inrs():
    return inr.siren_init(2, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("features,product", [(f, "gelu") for f in inr.FEATURES]
                         + [("gradients", "bilinear"), ("gradients++", "bilinear"), ("probing", "bilinear"),
                            ("gradients", "bilinear-grid")])
def test_editor_is_exactly_equivariant(inrs, features, product):
    torch.manual_seed(0)
    grid = product.endswith("-grid")  # pixel-grid coordinates and target -1 for the gradient set
    product = product.removesuffix("-grid")
    ed = inr.INREditor(features=features, zero_init=False, num_coords=16, probe_grid=4, product=product,
                       grad_grid=4 if grid else 0, grad_target=-1.0 if grid else 0.0).double().calibrate(inrs)
    if grid:
        assert ed.coords.shape == (16, 2) and ed.grad_target == -1.0
    if features != "weights":
        assert ed.aux.product == product
    spec = ed.spec
    perms = spec.random_permutations(torch.Generator().manual_seed(3))
    permuted = spec.permute(inrs, perms, leading=1)
    with torch.no_grad():
        delta, delta_p = ed(inrs), ed(permuted)
    want = spec.permute(delta, perms, leading=1)
    for k in delta:
        torch.testing.assert_close(delta_p[k], want[k], atol=1e-10, rtol=0, msg=lambda m: f"{k}: {m}")
    assert max(v.abs().max() for v in delta.values()) > 1e-3  # not trivially zero
    edited = inr.render({k: inrs[k] + delta[k] for k in inrs}, (6, 6))
    edited_p = inr.render({k: permuted[k] + delta_p[k] for k in inrs}, (6, 6))
    torch.testing.assert_close(edited_p, edited, atol=1e-10, rtol=0)
    # permuting the INR's level-1 weights without the matching columns of level 2 is not a
    # symmetry: the predicted Δθ must then differ from the permuted one
    broken = dict(inrs)
    broken["layers.0.weight"] = inrs["layers.0.weight"][:, perms["level1"]]
    with torch.no_grad():
        delta_b = ed(broken)
    assert not torch.allclose(delta_b["layers.1.weight"], spec.permute(delta, perms, leading=1)["layers.1.weight"],
                              atol=1e-6)


def test_zero_init_is_identity_and_edit_one_inr(inrs):
    ed = inr.INREditor(features="gradients", num_coords=16).double().calibrate(inrs)
    m = inr.Siren.from_params({k: v[0] for k, v in inrs.items()})
    out = inr.edit(m, ed)
    assert isinstance(out, inr.Siren)
    torch.testing.assert_close(out.params(), m.params())
    d = inr.edit({k: v[0] for k, v in inrs.items()}, ed)
    assert set(d) == set(inrs)


def test_unknown_features():
    with pytest.raises(ValueError, match="features must be one of"):
        inr.INREditor(features="magic")
    with pytest.raises(ValueError, match="product must be one of"):
        inr.INREditor(features="gradients", product="outer")


def test_parse_variant():
    assert inr.parse_variant("gradients") == ("gradients", "gelu")
    assert inr.parse_variant("gradients", "bilinear") == ("gradients", "bilinear")
    assert inr.parse_variant("gradients++:bilinear") == ("gradients++", "bilinear")
    assert inr.parse_variant("probing:gelu", "bilinear") == ("probing", "gelu")
    for bad, msg in [("magic:gelu", "features must be"), ("gradients:outer", "product must be"),
                     ("weights:bilinear", "no GradMetaNet branch")]:
        with pytest.raises(ValueError, match=msg):
            inr.parse_variant(bad)


@pytest.mark.parametrize("product", inr.PRODUCTS)
def test_aux_zero_init_starts_as_the_weight_only_function(inrs, product):
    kw = dict(zero_init=False, num_coords=16, channels=8)
    torch.manual_seed(0)
    ed = inr.INREditor(features="gradients", product=product, aux_zero_init=True, **kw).double().calibrate(inrs)
    ref = inr.INREditor(features="weights", **kw).double().calibrate(inrs)
    shared = {k: v for k, v in ed.state_dict().items() if k in ref.state_dict() and not k.startswith("head.e")}
    ref.load_state_dict(shared, strict=False)
    with torch.no_grad():
        for lin, lin_ref in ((ed.head.e2, ref.head.e2), (ed.head.e1, ref.head.e1)):
            lin_ref.weight.copy_(lin.weight[:, :1])
        got, want = ed(inrs), ref(inrs)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-12, rtol=0)
    # the feature weights do receive gradients once the output layer is non-zero
    loss = sum(v.square().sum() for v in ed(inrs).values())
    loss.backward()
    assert ed.head.e2.weight.grad[:, 1:].abs().max() > 0
