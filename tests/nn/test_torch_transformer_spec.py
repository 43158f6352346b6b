"""GradMetaNet on torch's nn.TransformerEncoder(Layer): permuting the real module's FFN units and
per-head q/k and v/o dims by the derived spec leaves its function unchanged, and the network's
outputs are exactly invariant / equivariant (float64, 1e-10)."""
import pytest
import torch
from torch import nn

import gradmeta as gm
from gradmeta.nn import symmetry_spec
from tests.nn.conftest import assert_gmn_equivariant, nontrivial_perms, permuted_model


def mse(out, y):
    return (out - y).pow(2).sum((1, 2))


def _encoder(kind, norm_first):
    layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, batch_first=True, norm_first=norm_first)
    if kind == "layer":
        return layer.double().eval()
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(6) if norm_first else None,
                                 enable_nested_tensor=False).double().eval()


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("kind", ["layer", "encoder"])
def test_equivariance_on_torch_transformer(kind, norm_first):
    torch.manual_seed(0)
    model = _encoder(kind, norm_first)
    spec = symmetry_spec(model)
    assert not spec.space("resid").permutable
    x, y = torch.randn(4, 5, 6, dtype=torch.float64), torch.randn(4, 5, 6, dtype=torch.float64)
    pad = torch.zeros(4, 5, dtype=torch.bool)
    pad[1, -1] = True
    inputs = {"src": x, "src_key_padding_mask": pad}
    perms = nontrivial_perms(spec, torch.Generator().manual_seed(3))
    pm = permuted_model(model, spec, perms)
    assert any(not torch.equal(a, b) for a, b in zip(pm.parameters(), model.parameters()))
    torch.testing.assert_close(pm(**inputs), model(**inputs), atol=1e-10, rtol=0)
    gs = gm.collect_gradients(model, mse, inputs, y)
    gp = gm.collect_gradients(pm, mse, inputs, y)
    assert not gs.fallback_params
    want = assert_gmn_equivariant(model, spec, perms, gs, gp)
    assert set(want) == {n for n, _ in model.named_parameters()}


def test_spec_refuses_separate_projection_weights():
    layer = nn.TransformerEncoderLayer(6, 2, 8)
    layer.self_attn = nn.MultiheadAttention(6, 2, kdim=4, vdim=4)
    with pytest.raises(gm.nn.SymmetrySpecError, match="only packed in_proj_weight"):
        symmetry_spec(layer)


def test_attention_dropout_in_training_mode_is_refused_saying_what_to_do():
    """Training-mode attention dropout sends the attention's parameters through the exact fallback;
    a GradMetaNet, which reads factors, names the layer and says to collect in eval mode."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(6, 2, 8, dropout=0.1, batch_first=True), 1,
                                  enable_nested_tensor=False).double()
    x, y = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    gs = gm.collect_gradients(model, mse, x, y)
    assert "layers.0.self_attn.in_proj_weight" in gs.fallback_params
    net = gm.nn.GradMetaNet.for_model(model, readout="weight", variant="plusplus", channels=4, heads=2).double()
    with pytest.raises(KeyError, match=r"'layers\.0\.self_attn' was not factored.*model\.eval\(\)"):
        net(gs)
    model.eval()
    out = net(gm.collect_gradients(model, mse, x, y))
    assert set(out) == {n for n, _ in model.named_parameters()}
