"""``GradMetaNet(variant=...)`` and ``ProductReadout(product=...)`` build one small class per option."""
import copy

import pytest
import torch

from gradmeta.models import mlp
from gradmeta.nn import (PRODUCTS, BilinearReadout, GeluReadout, GradMetaNet, GradMetaNetPlusPlus, NeuronLayout,
                         PooledGradMetaNet, ProductReadout, symmetry_spec)


@pytest.mark.parametrize("variant, cls", [("base", PooledGradMetaNet), ("plusplus", GradMetaNetPlusPlus)])
def test_variant_picks_its_class_with_the_same_weights(variant, cls):
    model = mlp([3, 4, 2])
    spec = symmetry_spec(model)
    torch.manual_seed(0)
    a = GradMetaNet.for_model(model, readout="weight", variant=variant, channels=4, heads=2)
    torch.manual_seed(0)
    b = cls(spec, "weight", channels=4, heads=2)
    torch.manual_seed(0)
    c = cls.for_model(model, readout="weight", channels=4, heads=2)
    assert type(a) is type(b) is type(c) is cls and isinstance(a, GradMetaNet) and a.variant == variant
    for other in (b, c):
        assert a.state_dict().keys() == other.state_dict().keys()
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), other.state_dict().values()))
    assert type(copy.deepcopy(a)) is cls
    with pytest.raises(ValueError, match="variant"):
        cls(spec, variant="plusplus" if variant == "base" else "base")


def test_default_variant_is_base():
    assert type(GradMetaNet.for_model(mlp([3, 4, 2]), channels=4)) is PooledGradMetaNet


@pytest.mark.parametrize("product, cls", [("gelu", GeluReadout), ("bilinear", BilinearReadout)])
def test_product_picks_its_readout(product, cls):
    spec = symmetry_spec(mlp([3, 4, 2]))
    offsets = NeuronLayout(spec).offsets
    assert product in PRODUCTS
    for ro in (ProductReadout(spec, offsets, 4, 3, product=product), ProductReadout(spec, offsets, 4, 3, 1, 0,
                                                                                     False, product)):
        assert type(ro) is cls and ro.product == product
    assert type(ProductReadout(spec, offsets, 4, 3)) is GeluReadout
    net = GradMetaNet.for_model(mlp([3, 4, 2]), readout="weight", product=product, channels=4)
    assert type(net.head) is cls
    with pytest.raises(ValueError, match="product"):
        cls(spec, offsets, 4, 3, product="gelu" if product == "bilinear" else "bilinear")
    with pytest.raises(ValueError, match="product must be one of"):
        ProductReadout(spec, offsets, 4, 3, product="bogus")
    assert not hasattr(GeluReadout(spec, offsets, 4, 3), "products")


def test_neuron_attention_is_checked_and_only_for_plusplus():
    model = mlp([3, 4, 2])
    net = GradMetaNet.for_model(model, variant="plusplus", channels=4, heads=2, neuron_attention="linear")
    assert all(b.neuron_attn.kind == "linear" and b.data_attn.kind == "softmax" for b in net.blocks)
    with pytest.raises(ValueError, match="variant='plusplus'"):
        GradMetaNet.for_model(model, variant="base", channels=4, neuron_attention="linear")
    with pytest.raises(ValueError, match="neuron_attention must be one of"):
        GradMetaNet.for_model(model, variant="plusplus", channels=4, heads=2, neuron_attention="performer")
