"""The CPU fast paths of GradMetaNet's layers equal their plain formulas in float64: few-channel
products as ``weight @ xᵀ``, the set×neuron layer with its bias folded into the small terms, and
the neuron encoder's single product over the bag."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from gradmeta.models import mlp
from gradmeta.nn import GradMetaNet, symmetry_spec
from gradmeta.nn._layers import SetNeuronLayer, linear


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("c_in,c_out", [(4, 8), (8, 4), (8, 8), (8, 24), (3, 1)])
def test_linear_equals_f_linear(c_in, c_out):
    g = _gen()
    x = torch.randn(2, 5, 1, 7, c_in, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-13, atol=1e-13)
    # under vmap over per-particle weights (the learned optimizers' case) and on a non-contiguous input
    ws, bs = torch.randn(3, c_out, c_in, generator=g, dtype=torch.float64), torch.randn(3, c_out, generator=g,
                                                                                          dtype=torch.float64)
    xt = x.transpose(1, 3)
    torch.testing.assert_close(vmap(linear, (None, 0, 0))(xt, ws, bs),
                               torch.stack([F.linear(xt, ws[i], bs[i]) for i in range(3)]), rtol=1e-13, atol=1e-13)


def _set_layer_naive(layer, g):
    """``M₁g + M₂ mean_t g + M₃ mean_{b,t} g + M₄ mean_n g + M₅ mean_{b,t,n} g + bias``, term by term."""
    tok, data, neuron, everything = layer.pools
    lin = lambda m, x: x @ m.weight.T  # noqa: E731
    return (lin(layer.self_, g) + layer.self_.bias + lin(tok, g.mean(2, keepdim=True))
            + lin(data, g.mean((1, 2), keepdim=True)) + lin(neuron, g.mean(3, keepdim=True))
            + lin(everything, g.mean((1, 2, 3), keepdim=True)))


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("T", [1, 3])
def test_set_neuron_layer_equals_its_formula(T, G):
    torch.manual_seed(0)
    layer = SetNeuronLayer(8, 6).double()
    g = torch.randn(G, 5, T, 11, 8, generator=_gen(1), dtype=torch.float64)
    expected = _set_layer_naive(layer, g)
    torch.testing.assert_close(layer(g), expected, rtol=1e-12, atol=1e-12)
    # channels first, from a contiguous and from a strided (channels-last) tensor
    torch.testing.assert_close(layer.forward_channels_first(g.movedim(-1, 1).contiguous()),
                               expected.movedim(-1, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.forward_channels_first(g.movedim(-1, 1)), expected.movedim(-1, 1),
                               rtol=1e-12, atol=1e-12)


def test_set_neuron_layer_under_vmap_over_parameters():
    """Per-particle parameters (the learned optimizers' PES) give each particle's own layer."""
    from torch.func import functional_call, stack_module_state

    layers = [SetNeuronLayer(8, 8).double() for _ in range(3)]
    params, _ = stack_module_state(layers)
    g = torch.randn(3, 1, 4, 1, 9, 8, generator=_gen(2), dtype=torch.float64)
    out = vmap(lambda p, x: functional_call(layers[0], p, (x,)))(params, g)
    torch.testing.assert_close(out, torch.stack([_set_layer_naive(m, x) for m, x in zip(layers, g)]),
                               rtol=1e-12, atol=1e-12)


def test_data_pool_channels_first_equals_channels_last():
    from gradmeta.nn import DataPool

    torch.manual_seed(0)
    pool = DataPool(8, 5).double()
    g = torch.randn(2, 4, 3, 7, 8, generator=_gen(3), dtype=torch.float64)
    torch.testing.assert_close(pool.forward_channels_first(g.movedim(-1, 1)), pool(g), rtol=1e-12, atol=1e-12)


def _encoder_naive(enc, feats):
    """Per space: ``embed(x) + pos_map(code)[k]`` (+ the neuron id of a fixed space), concatenated."""
    pos = enc.pos_code.to(enc.pos_map.weight.dtype) @ enc.pos_map.weight.T
    parts = []
    for k, s in enumerate(enc.layout.spec.spaces):
        emb = enc.embed[enc.layout.group_of[s.name].replace(".", "_")]
        x = torch.stack([f[s.name] for f in feats]).to(pos.dtype)
        y = x @ emb.weight.T + emb.bias + pos[k]
        if not s.permutable:
            y = y + enc.ids[s.name.replace(".", "_")]
        parts.append(y)
    return torch.cat(parts, -2)


@pytest.mark.parametrize("sets", [1, 2])
def test_neuron_encoder_equals_its_formula(sets):
    import gradmeta as gm

    torch.manual_seed(0)
    model = mlp([6, 5, 4, 3]).double()
    net = GradMetaNet(symmetry_spec(model), channels=8).double()
    feats = []
    for i in range(sets):
        x, y = torch.randn(7, 6, generator=_gen(i), dtype=torch.float64), torch.arange(7) % 3
        gs = gm.collect_gradients(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)
        feats.append(net.layout.features(gs))
    torch.testing.assert_close(net.encoder(feats), _encoder_naive(net.encoder, feats), rtol=1e-12, atol=1e-12)


def test_neuron_encoder_with_several_embeddings_equals_its_formula():
    """A transformer's spaces have several kinds (one embedding each): per-space products."""
    import gradmeta as gm
    from gradmeta.models import GPT

    torch.manual_seed(0)
    model = GPT(vocab=7, d_model=8, n_heads=2, n_blocks=1, max_len=5).double()
    net = GradMetaNet(symmetry_spec(model), channels=8).double()
    assert len(net.encoder.embed) > 1
    x = torch.randint(0, 7, (3, 5), generator=_gen(5))
    gs = gm.collect_gradients(model, lambda o, t: F.cross_entropy(o.transpose(1, 2), t, reduction="none").mean(1),
                              x, x)
    feats = [net.layout.features(gs)]
    torch.testing.assert_close(net.encoder(feats), _encoder_naive(net.encoder, feats), rtol=1e-12, atol=1e-12)
