"""Per-example gradients and derived quantities against naive loops and materialised definitions."""
import pytest
import torch

import gradmeta as gm
from gradmeta.grads import _factors
from tests.conftest import assert_dicts_close, flatten_params, naive_per_example_grads
from tests.grads.models import cases

CASES = cases()


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]


def test_hooks_path_equals_naive_loop(case):
    model, loss_fn, x, y = case
    want = naive_per_example_grads(model, loss_fn, x, y)
    assert_dicts_close(gm.collect_gradients(model, loss_fn, x, y).per_example_grads(), want)


def test_func_path_equals_naive_loop(case):
    model, loss_fn, x, y = case
    want = naive_per_example_grads(model, loss_fn, x, y)
    assert_dicts_close(gm.per_example_grads(model, loss_fn, x, y), want)
    assert_dicts_close(gm.per_example_grads(model, loss_fn, x, y, chunk_size=2), want)


def test_factor_shapes_follow_design(case):
    model, loss_fn, x, y = case
    gs = gm.collect_gradients(model, loss_fn, x, y)
    B = x.shape[0]
    named = dict(model.named_modules())
    assert gs.layer_names == [n for n in named if n in gs]          # forward order = registration order here
    for name in gs.layer_names:
        f = gs[name]
        A, D = f.activations, f.backprops
        assert A.shape[:2] == D.shape[:2] and A.shape[0] == B and A.dim() == D.dim() == 3
        assert not A.requires_grad and not D.requires_grad
        if f.module_type == "Linear":
            assert (A.shape[-1], D.shape[-1]) == (named[name].in_features, named[name].out_features)


def test_mean_grad_equals_autograd_of_mean_loss(case):
    model, loss_fn, x, y = case
    model.zero_grad(set_to_none=True)
    gs = gm.collect_gradients(model, loss_fn, x, y)
    assert all(p.grad is None for p in model.parameters()), "collect_gradients must not touch .grad"
    loss = loss_fn(model(x), y).mean()
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    want = dict(zip(names, torch.autograd.grad(loss, params)))
    assert_dicts_close(gs.mean_grad(), want)


@pytest.mark.parametrize("chunk", [None, 7])
def test_norms_gram_fisher_equal_materialised(case, chunk, monkeypatch):
    if chunk:   # exercise the chunked per-example branches too
        monkeypatch.setattr(_factors, "_CHUNK_ELEMENTS", chunk)
    model, loss_fn, x, y = case
    gs = gm.collect_gradients(model, loss_fn, x, y)
    pe = naive_per_example_grads(model, loss_fn, x, y)
    flat = flatten_params(pe)
    torch.testing.assert_close(gs.grad_norms(), flat.norm(dim=1), atol=1e-10, rtol=0)
    torch.testing.assert_close(gs.gram(), flat @ flat.T, atol=1e-10, rtol=0)
    assert_dicts_close(gs.fisher_diagonal(), {k: (g ** 2).mean(0) for k, g in pe.items()})
    for name, norms in gs.layer_grad_norms().items():
        own = {k: pe[k] for k in gs[name].param_names.values()}
        torch.testing.assert_close(norms, flatten_params(own).norm(dim=1), atol=1e-10, rtol=0)


def test_kfac_factors_equal_definitions(case):
    model, loss_fn, x, y = case
    gs = gm.collect_gradients(model, loss_fn, x, y)
    factors = gs.kfac_factors()
    assert set(factors) == {n for n in gs.layer_names if gs[n].module_type != "LayerNorm"}
    for name, (a_cov, g_cov) in factors.items():
        f = gs[name]
        A, D = f.activations, f.backprops
        if "bias" in f.param_names:
            A = torch.cat([A, torch.ones_like(A[..., :1])], -1)
        B, T = D.shape[:2]
        want_a = sum(A[b, t][:, None] * A[b, t][None] for b in range(B) for t in range(T)) / (B * T)
        want_g = sum(D[b, t][:, None] * D[b, t][None] for b in range(B) for t in range(T)) / B
        torch.testing.assert_close(a_cov, want_a, atol=1e-10, rtol=0)
        torch.testing.assert_close(g_cov, want_g, atol=1e-10, rtol=0)


def test_kfac_is_exact_fisher_for_single_example_mlp():
    model, loss_fn, x, y = CASES["mlp_bias"]
    gs = gm.collect_gradients(model, loss_fn, x[:1], y[:1])
    a_cov, g_cov = gs.kfac_factors()["0"]
    g = torch.cat([gs.per_example_grads()["0.weight"][0], gs.per_example_grads()["0.bias"][0][:, None]], 1)
    # vec in row-major (d_out, d_in+1) layout: F = G_cov ⊗ A_cov
    torch.testing.assert_close(torch.kron(g_cov, a_cov), torch.outer(g.flatten(), g.flatten()),
                               atol=1e-10, rtol=0)


def test_factored_and_materialised_branches_agree():
    # T² (d_in + d_out) > d_in d_out here, so gram / norms take the materialised branch.
    a, d = torch.randn(3, 7, 2, dtype=torch.float64), torch.randn(3, 7, 2, dtype=torch.float64)
    g = _factors.bilinear_per_example(a, d).flatten(1)
    torch.testing.assert_close(_factors.bilinear_gram(a, d), g @ g.T)
    torch.testing.assert_close(_factors.bilinear_sq_norms(a, d), (g ** 2).sum(1))
    a, d = torch.randn(3, 2, 9, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64)
    g = _factors.bilinear_per_example(a, d).flatten(1)
    torch.testing.assert_close(_factors.bilinear_gram(a, d), g @ g.T)
    torch.testing.assert_close(_factors.bilinear_sq_norms(a, d), (g ** 2).sum(1))


def test_examples_are_a_set():
    model, loss_fn, x, y = CASES["gpt_preln"]
    perm = torch.randperm(x.shape[0])
    gs, gp = gm.collect_gradients(model, loss_fn, x, y), gm.collect_gradients(model, loss_fn, x[perm], y[perm])
    torch.testing.assert_close(gp.grad_norms(), gs.grad_norms()[perm])
    torch.testing.assert_close(gp.gram(), gs.gram()[perm][:, perm])
    assert_dicts_close(gp.mean_grad(), gs.mean_grad(), atol=1e-12)


def test_map_factors_rescales_every_quantity_exactly():
    """Scaling A by 1/s_a and Δ by 1/s_d per layer scales each per-example gradient by 1/(s_a s_d)
    (bias: 1/s_d) -- checked on materialised gradients, norms, Gram and Fisher diagonal."""
    import gradmeta as gm
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
    gs = gm.collect_gradients(model, loss, x, y)
    s = {"0": (2.0, 3.0), "2": (0.5, 7.0)}
    mapped = gs.map_factors(lambda n, a, d: (a / s[n][0], d / s[n][1]))
    want = {}
    for k, g in gs.per_example_grads().items():
        layer, kind = k.split(".")
        want[k] = g / (s[layer][1] * (s[layer][0] if kind == "weight" else 1.0))
    got = mapped.per_example_grads()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=0)
    flat = torch.cat([want[k].flatten(1) for k in want], 1)
    torch.testing.assert_close(mapped.grad_norms(), flat.norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(mapped.gram(), flat @ flat.T, rtol=1e-12, atol=1e-14)
    assert gs["0"].activations.abs().sum() > 0 and not torch.equal(gs["0"].activations, mapped["0"].activations)
    with pytest.raises(ValueError, match="changed the shapes of layer '0'"):
        gs.map_factors(lambda n, a, d: (a[:, :, :2], d))


def test_map_factors_refuses_embedding_layers():
    import gradmeta as gm
    from torch import nn
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 2))
    gs = gm.collect_gradients(model, lambda o, t: (o - t).square().sum(1), torch.randint(0, 7, (3, 2)),
                              torch.zeros(3, 2))
    with pytest.raises(ValueError, match="layer '0' \\(Embedding\\)"):
        gs.map_factors(lambda n, a, d: (a, d))
