"""GLNet and baselines: shapes, GL(r) / O(r) (in)variance in float64, rank padding, checkpoints."""
from __future__ import annotations

import pytest
import torch

from gradmeta import lora


@pytest.fixture(scope="module")
def adapters(zoo_root):
    return [a.to(torch.float64) for a, _ in lora.LoraDataset(zoo_root)]


def gl_all(ad, seed=0, orthogonal=False):
    g = torch.Generator().manual_seed(seed)
    Rs = {k: lora.random_gl(f.rank, generator=g, cond=1.0 if orthogonal else 10.0) for k, f in ad.items()}
    return ad.transform(Rs)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def build(cls, ad, **kw):
    torch.manual_seed(0)
    net = cls.for_adapter(ad, out_dim=3, **kw).double()
    return net


def test_glnet_shape_and_mixed_ranks(adapters):
    net = build(lora.GLNet, adapters[0])
    out = net(adapters)  # ranks 2, 4, 8 together
    assert out.shape == (6, 3) and out.dtype == torch.float64
    assert net(adapters[:2]).shape == (2, 3)
    torch.testing.assert_close(net(adapters[3]), out[3:4], rtol=1e-12, atol=1e-12)


def test_glnet_gl_invariant_and_not_trivial(adapters):
    net = build(lora.GLNet, adapters[0]).fit_input_scale(adapters)
    ref = net(adapters)
    moved = net([gl_all(a, seed=i) for i, a in enumerate(adapters)])
    assert rel(moved, ref) < 1e-8
    # scaling U alone (not a GL action on the pair: U Vᵀ changes) must change the output
    bent = [a.map(lambda _, f: f.__class__(f.U * 1.5, f.V, f.scale, f.weight_shape, f.kind)) for a in adapters]
    assert rel(net(bent), ref) > 1e-3


def test_glnet_zero_padded_rank_same_output(adapters):
    net = build(lora.GLNet, adapters[0])
    ref = net(adapters)
    torch.testing.assert_close(net([a.pad_rank(12) for a in adapters]), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [lora.DenseMLP, lora.SVDMLP])
def test_product_baselines_gl_invariant(adapters, cls):
    net = build(cls, adapters[0])
    ref = net(adapters)
    assert rel(net([gl_all(a, seed=3) for a in adapters]), ref) < 1e-8


def test_procrustes_only_orthogonal_invariant(adapters):
    # the alignment is unique when r equals the template's rank and r <= n (rank-2 adapters here)
    rank2 = [adapters[0], adapters[3]]
    net = build(lora.ProcrustesMLP, adapters[0], max_rank=2).fit_template(adapters[0])
    ref = net(rank2)
    assert rel(net([gl_all(a, seed=5, orthogonal=True) for a in rank2]), ref) < 1e-8
    assert rel(net([gl_all(a, seed=5) for a in rank2]), ref) > 1e-3
    with pytest.raises(RuntimeError, match="fit_template"):
        build(lora.ProcrustesMLP, adapters[0])(adapters)


@pytest.mark.parametrize("cls", [lora.FactorMLP, lora.LayerTransformer])
def test_flat_baselines_not_invariant(adapters, cls):
    net = build(cls, adapters[0], max_rank=8)
    ref = net(adapters)
    assert rel(net([gl_all(a, seed=5, orthogonal=True) for a in adapters]), ref) > 1e-3
    with pytest.raises(ValueError, match="max_rank 8"):
        net([adapters[0].pad_rank(9)])


def test_canonical_svd_gl_invariant(adapters):
    for a in adapters:
        c1, c2 = lora.canonical_adapter(a), lora.canonical_adapter(gl_all(a, seed=7))
        for k in a:
            torch.testing.assert_close(c1[k].delta(), a[k].delta(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(c2[k].U, c1[k].U, rtol=1e-7, atol=1e-9)
            torch.testing.assert_close(c2[k].V, c1[k].V, rtol=1e-7, atol=1e-9)
    P, s, Q = lora.canonical_svd(adapters[0]["0"].U, adapters[0]["0"].V, adapters[0]["0"].scale)
    torch.testing.assert_close(P.T @ P, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (s[:-1] >= s[1:]).all()


@pytest.mark.parametrize("cls", [lora.GLNet, lora.FactorMLP, lora.DenseMLP, lora.SVDMLP, lora.ProcrustesMLP,
                                 lora.LayerTransformer])
def test_save_load_roundtrip(adapters, tmp_path, cls):
    net = build(cls, adapters[0]).fit_input_scale(adapters)
    if cls is lora.ProcrustesMLP:
        net.fit_template(adapters[0])
    net.eval()
    path = lora.save_model(net, tmp_path / "m.pt", targets=["acc"])
    back, extra = lora.load_model(path)
    assert type(back) is cls and extra == {"targets": ["acc"]}
    torch.testing.assert_close(back(adapters), net(adapters))


def test_wrong_module_shape_error(adapters):
    net = lora.GLNet({"0": (6, 4), "2": (3, 6)})
    with pytest.raises(ValueError, match=r"module '0' is \(6, 5\), the model was built for \(6, 4\)"):
        net(adapters[0].to(torch.float32))


def test_glnet_singular_value_branch_and_legacy_checkpoints(adapters, tmp_path):
    """The spectral branch sees exactly the singular values of each U Vᵀ; a checkpoint saved before the
    branch existed (no sv_k in its kwargs) loads as the model it was."""
    a = [x.to(torch.float64) for x in adapters]
    net = lora.GLNet.for_adapter(a[0]).double().eval()
    with torch.no_grad():
        net.gate.fill_(0.0)  # spectral branch only
        pairs = net.pairs(a)
        dense = {k: torch.linalg.svdvals(U @ V.transpose(-1, -2)) for k, (U, V) in pairs.items()}
        sv = torch.cat([torch.nn.functional.pad(dense[k], (0, 16 - dense[k].shape[-1]))[..., :16]
                        for k in net.names], -1)
        torch.testing.assert_close(net(a), net.sv_mlp(sv), rtol=1e-10, atol=1e-12)
    old = lora.GLNet.for_adapter(a[0], sv_k=0).eval()
    ckpt = {"model": "GLNet", "kwargs": {k: v for k, v in old.kwargs.items() if k not in ("sv_k", "sv_hidden")},
            "state_dict": old.state_dict()}
    torch.save(ckpt, tmp_path / "old.pt")
    back, _ = lora.load_model(tmp_path / "old.pt")
    assert back.sv_k == 0
    x = [ad.to(torch.float32) for ad in adapters]
    torch.testing.assert_close(back(x), old(x))


def test_glnet_spectral_path_is_svdmlp_and_residual_starts_at_zero(adapters):
    """Under one seed, GLNet(residual=False) is SVDMLP (same init, same trained weights and outputs);
    the full GLNet starts as that function (zero gate) and stays exactly GL(r)-invariant."""
    from gradmeta._training import minibatch_train

    a = [x.to(torch.float64) for x in adapters]
    y = torch.linspace(-1, 1, len(a), dtype=torch.float64)[:, None]

    def trained(cls, **kw):
        torch.manual_seed(0)
        net = cls.for_adapter(a[0], **kw).double().fit_input_scale(a)
        pairs = net.pairs(a)
        minibatch_train(net, lambda i: ((net.forward_pairs({k: (U[i], V[i]) for k, (U, V) in pairs.items()})
                                         - y[i]) ** 2).mean(), len(a), epochs=3, batch_size=4, lr=1e-2, seed=0,
                        optimizer="adamw", weight_decay=1e-4)
        return net.eval()

    svd, spectral = trained(lora.SVDMLP), trained(lora.GLNet, residual=False)
    assert not hasattr(spectral, "body")
    for p, q in zip(svd.mlp.parameters(), spectral.sv_mlp.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(svd(a), spectral(a))
    torch.manual_seed(0)
    full = lora.GLNet.for_adapter(a[0]).double().fit_input_scale(a)
    torch.manual_seed(0)
    fresh_svd = lora.SVDMLP.for_adapter(a[0]).double().fit_input_scale(a)
    assert float(full.gate.detach()) == 0.0 and torch.equal(full(a), fresh_svd(a))
    with torch.no_grad():
        full.gate.fill_(0.7)
    ref = full(a)
    assert rel(ref, fresh_svd(a)) > 1e-3  # the residual now contributes ...
    assert rel(full([gl_all(x, seed=i) for i, x in enumerate(a)]), ref) < 1e-8  # ... and is GL(r)-invariant
    torch.testing.assert_close(full([x.pad_rank(12) for x in a]), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="nothing to compute"):
        lora.GLNet.for_adapter(a[0], sv_k=0, residual=False)
