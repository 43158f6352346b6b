"""GradMetaNet++'s explicit attention, attention block and per-datum gelu readout against slow
references written from the formulas (float64, loops over sequences / parameter entries), chunked
and unchunked, and under ``vmap`` (no per-sample fallback: no performance warning)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

import gradmeta.nn._layers as layers
from gradmeta.nn import GradMetaNet, NeuronLayout, symmetry_spec
from gradmeta.nn._layers import AttentionBlock, ProductReadout, attention, linear_attention
from gradmeta.models import mlp

TOL = 1e-12


def naive_attention(q, k, v):
    """``softmax(q kᵀ/√d) v`` one sequence at a time, the softmax written out."""
    *lead, L, d = q.shape
    qf, kf, vf = q.reshape(-1, L, d), k.reshape(-1, L, d), v.reshape(-1, L, d)
    out = torch.empty_like(qf)
    for b in range(qf.shape[0]):
        s = qf[b] @ kf[b].T / math.sqrt(d)
        e = torch.exp(s - s.max(1, keepdim=True).values)
        out[b] = (e / e.sum(1, keepdim=True)) @ vf[b]
    return out.view(*lead, L, d)


def naive_linear_attention(q, k, v):
    """``y_i = Σ_j w_ij v_j`` with ``w_ij = φ(q_i)·φ(k_j) / Σ_j' φ(q_i)·φ(k_j')``, ``φ(x) = x + 1`` for
    ``x > 0`` else ``exp(x)``, entry by entry."""
    *lead, L, d = q.shape
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))  # noqa: E731
    qf, kf, vf = phi(q.reshape(-1, L, d)), phi(k.reshape(-1, L, d)), v.reshape(-1, L, d)
    out = torch.zeros_like(vf)
    for b in range(qf.shape[0]):
        for i in range(L):
            w = torch.stack([qf[b, i] @ kf[b, j] for j in range(L)])
            out[b, i] = (w / w.sum()) @ vf[b]
    return out.view(*lead, L, d)


def naive_layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def naive_mha(x, mha):
    """``x (L, c)``: one sequence; q, k, v are the first, second and third ``c`` outputs of ``qkv``,
    each split into ``heads`` consecutive slices."""
    L, c = x.shape
    h = mha.heads
    d = c // h
    qkv = x @ mha.qkv.weight.T + mha.qkv.bias
    q, k, v = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]
    attend = naive_attention if mha.kind == "softmax" else naive_linear_attention
    heads = [attend(q[:, i * d:(i + 1) * d], k[:, i * d:(i + 1) * d], v[:, i * d:(i + 1) * d]) for i in range(h)]
    return torch.cat(heads, 1) @ mha.out.weight.T + mha.out.bias


def naive_block(x, block):
    """Pre-norm residual block on ``(G, S, N, c)``: data attention for every (g, n), neuron
    attention for every (g, s), then the channel MLP (exact gelu)."""
    G, S, N, c = x.shape
    x1 = x.clone()
    for g in range(G):
        for n in range(N):
            x1[g, :, n] = x[g, :, n] + naive_mha(naive_layer_norm(x[g, :, n], block.n1), block.data_attn)
    x2 = x1.clone()
    for g in range(G):
        for s in range(S):
            x2[g, s] = x1[g, s] + naive_mha(naive_layer_norm(x1[g, s], block.n2), block.neuron_attn)
    lin1, _, lin2 = block.mlp
    z = naive_layer_norm(x2, block.n3) @ lin1.weight.T + lin1.bias
    z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    return x2 + z @ lin2.weight.T + lin2.bias


def _randomise(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


@pytest.mark.parametrize("shape", [(5, 1, 4), (2, 3, 7, 6), (1, 1, 1, 3), (4, 2, 16, 8)])
def test_attention_equals_naive_and_sdpa(shape, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    want = naive_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), want, atol=TOL, rtol=0)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), want, atol=TOL, rtol=0)
    monkeypatch.setattr(layers, "_SCORES_ELEMENTS", 1)  # one sequence per chunk
    torch.testing.assert_close(attention(q, k, v), want, atol=TOL, rtol=0)


def test_attention_under_vmap_is_batched_and_equals_the_loop(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 3, 5, 9, 2, generator=gen, dtype=torch.float64) for _ in range(3))
    want = torch.stack([naive_attention(q[i], k[i], v[i]) for i in range(4)])
    for chunk in (1 << 16, 20):  # whole, and 20 scores a chunk (several sequences of 81 each... one)
        monkeypatch.setattr(layers, "_SCORES_ELEMENTS", chunk)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a missing batching rule warns "There is a performance drop ..."
            got = vmap(attention)(q, k, v)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("shape", [(5, 1, 4), (2, 3, 7, 6), (1, 1, 1, 3)])
def test_linear_attention_equals_naive_and_is_permutation_equivariant(shape):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (3 * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    got = linear_attention(q, k, v)
    torch.testing.assert_close(got, naive_linear_attention(q, k, v), atol=TOL, rtol=0)
    perm = torch.randperm(shape[-2], generator=gen)
    torch.testing.assert_close(linear_attention(q[..., perm, :], k[..., perm, :], v[..., perm, :]),
                               got[..., perm, :], atol=TOL, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched by vmap, no per-sample fallback
        torch.testing.assert_close(vmap(linear_attention)(q, k, v), got, atol=TOL, rtol=0)


@pytest.mark.parametrize("heads,kind", [(1, "softmax"), (2, "softmax"), (1, "linear"), (2, "linear")])
def test_attention_block_equals_naive_reference(heads, kind, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    block = AttentionBlock(4, heads, neuron_attention=kind).double()
    _randomise(block, gen)
    x = torch.randn(2, 5, 7, 4, generator=gen, dtype=torch.float64)
    want = naive_block(x, block)
    torch.testing.assert_close(block(x), want, atol=TOL, rtol=0)
    monkeypatch.setattr(layers, "_SCORES_ELEMENTS", 1)
    torch.testing.assert_close(block(x), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_attention_block_under_vmap_over_parameters_equals_the_loop(kind):
    """PES-style: every particle has its own block parameters and its own input."""
    gen = torch.Generator().manual_seed(3)
    block = AttentionBlock(4, 2, neuron_attention=kind).double()
    params = {n: p.detach() + 0.3 * torch.randn(3, *p.shape, generator=gen, dtype=torch.float64)
              for n, p in block.named_parameters()}
    x = torch.randn(3, 1, 6, 5, 4, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(lambda p, xi: functional_call(block, p, (xi,)))(params, x)
    for i in range(3):
        with torch.no_grad():
            for n, p in block.named_parameters():
                p.copy_(params[n][i])
        torch.testing.assert_close(got[i], naive_block(x[i], block), atol=TOL, rtol=0)


def naive_gelu_readout(ro, h, edges):
    """``Ŵ[i, j] = w₂ · mean_s gelu(U h_s[X_i] + V h_s[Y_j] + E e[i, j] + p) + b₂`` (and the 1-axis
    form), entry by entry; ``h (G, S, N, c)`` or ``(G, N, c)`` (then S = 1)."""
    h = h if h.dim() == 4 else h.unsqueeze(1)
    gelu = lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    out = {}
    for k, (name, axes) in enumerate(ro.spec.params):
        rows = [torch.cat([h[:, :, slice(*ro.offsets[s])] for s in ax], 2) for ax in axes]  # (G, S, n, c)
        G = h.shape[0]
        shape = tuple(r.shape[2] for r in rows)
        res = torch.empty(G, *shape, ro.out_dim, dtype=h.dtype)
        for g in range(G):
            for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist():
                if len(axes) == 2:
                    i, j = idx
                    pre = rows[0][g, :, i] @ ro.u2.weight.T + ro.u2.bias + rows[1][g, :, j] @ ro.v2.weight.T
                    el, lin = ro.e2, ro.w2
                else:
                    pre = rows[0][g, :, idx[0]] @ ro.u1.weight.T + ro.u1.bias
                    el, lin = ro.e1, ro.w1
                if edges is not None:
                    pre = pre + edges[name][(g, *idx)] @ el.weight.T
                if ro.pid is not None:
                    pre = pre + ro.pid[k]
                res[(g, *idx)] = gelu(pre).mean(0) @ lin.weight.T + lin.bias
        out[name] = res.squeeze(-1) if ro.out_dim == 1 else res
    return out


@pytest.mark.parametrize("per_datum", [True, False])
@pytest.mark.parametrize("edges,param_ids,out_dim", [(False, False, 1), (True, True, 3), (False, True, 2)])
def test_gelu_readout_equals_naive_reference(per_datum, edges, param_ids, out_dim, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    spec = symmetry_spec(mlp([3, 4, 2]))
    layout = NeuronLayout(spec)
    N = layout.offsets[spec.spaces[-1].name][1]
    ro = ProductReadout(spec, layout.offsets, 5, 6, out_dim, edge_channels=2 if edges else 0,
                        param_ids=param_ids).double()
    _randomise(ro, gen)
    h = torch.randn(2, 7, N, 5, generator=gen, dtype=torch.float64)
    h = h if per_datum else h[:, 0]
    e = ({n: torch.randn(2, *p.shape, 2, generator=gen, dtype=torch.float64)
          for n, p in mlp([3, 4, 2]).named_parameters()} if edges else None)
    want = naive_gelu_readout(ro, h, e)
    for mode in ("whole", "chunked"):
        if mode == "chunked":  # a few data per chunk, with and without autograd (checkpointing)
            monkeypatch.setattr(layers, "_CACHE_ELEMENTS", 40)
            monkeypatch.setattr(layers, "_CHUNK_ELEMENTS", 40)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                got = ro(h, e)
            for n in want:
                torch.testing.assert_close(got[n], want[n], atol=TOL, rtol=0)


def test_plusplus_under_vmap_over_particles_equals_the_loop(refs):
    """A whole GradMetaNet++ (weight readout) vmapped over per-particle parameters and gradient
    sets equals one call per particle, without a per-sample fallback."""
    model, x, y = refs.mlp_case([4, 6, 3], 5, 0)
    torch.manual_seed(0)
    net = GradMetaNet.for_model(model, readout="weight", out_dim=2, variant="plusplus", channels=4,
                                set_layers=2, heads=2).double()
    from gradmeta.grads import functional_factors
    from gradmeta.models import classification_loss
    gen = torch.Generator().manual_seed(5)
    xs = torch.stack([x + 0.1 * i * torch.randn(x.shape, generator=gen, dtype=x.dtype) for i in range(3)])
    params = {n: p.detach() + 0.2 * torch.randn(3, *p.shape, generator=gen, dtype=p.dtype)
              for n, p in net.named_parameters()}
    mparams = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi):
        return functional_call(net, p, (functional_factors(model, classification_loss, mparams, xi, y),))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(one)(params, xs)
    for i in range(3):
        want = functional_call(net, {n: v[i] for n, v in params.items()}, (refs.collect(model, xs[i], y),))
        for n in want:
            torch.testing.assert_close(got[n][i], want[n], atol=TOL, rtol=0)


def test_fused_kernel_when_a_graph_is_recorded_explicit_form_otherwise(monkeypatch):
    """Under autograd the fused kernel (no saved score matrices) is used; without a graph (PES under
    ``vmap``) the explicit form; both equal the naive reference, gradients included."""
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        out = attention(q, k, v)
    assert calls == [] and torch.allclose(out, naive_attention(q, k, v), atol=TOL, rtol=0)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    attention(qg, kg, vg).square().sum().backward()
    assert calls == [1]
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    naive_attention(qr, kr, vr).square().sum().backward()
    for a, b in ((qg, qr), (kg, kr), (vg, vr)):
        assert torch.allclose(a.grad, b.grad, atol=1e-10, rtol=0)
