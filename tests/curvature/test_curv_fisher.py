"""Fisher diagonal (empirical, Monte-Carlo) and K-FAC against naive per-example references (float64)."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from gradmeta import curvature as gc
from gradmeta.models import classification_loss

from tests.curvature.conftest import flat_params, mse_loss, naive_per_example_grads, reference_ggn

TOL = 1e-10


def _cat(d, model):
    return torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()])


@pytest.mark.parametrize("route", ["factors", "per_example"])
def test_empirical_fisher_equals_naive_sum(case, route):
    model, loss_fn, X, y = case
    naive = {n: (g ** 2).mean(0) for n, g in naive_per_example_grads(model, loss_fn, X, y).items()}
    parts = [(X[:3], y[:3]), (X[3:], y[3:])]
    for data in ((X, y), parts):
        fd = gc.fisher_diagonal(model, loss_fn, data, route=route)
        assert list(fd) == list(naive)
        torch.testing.assert_close(_cat(fd, model), _cat(naive, model), atol=TOL, rtol=0)


def test_empirical_fisher_transformer(gpt):
    model, loss_fn, X, y = gpt
    naive = {n: (g ** 2).mean(0) for n, g in naive_per_example_grads(model, loss_fn, X, y).items()}
    fd = gc.fisher_diagonal(model, loss_fn, (X, y), route="factors")
    torch.testing.assert_close(_cat(fd, model), _cat(naive, model), atol=TOL, rtol=0)


def test_mc_fisher_categorical_converges_to_ggn(mlp_ce):
    """E_y~p[g(y)²] (enumerated over the classes) equals the GGN diagonal exactly; the MC estimate is
    within 4 standard deviations of it (its variance is also computed by enumeration)."""
    model, loss_fn, X, y = mlp_ce
    N, C = X.shape[0], 3
    ggn_diag = reference_ggn(model, loss_fn, X, y).diagonal()
    probs = model(X).softmax(-1).detach()
    sq = torch.stack([torch.cat([g.reshape(N, -1) ** 2 for g in naive_per_example_grads(
        model, loss_fn, X, torch.full((N,), c)).values()], 1) for c in range(C)])  # (C, N, P)
    mean_n = (probs.T[..., None] * sq).sum(0)                     # (N, P)
    var_n = (probs.T[..., None] * sq ** 2).sum(0) - mean_n ** 2
    torch.testing.assert_close(mean_n.mean(0), ggn_diag, atol=TOL, rtol=0)
    R = 400  # draws per example: 40 copies of the data × 10 samples
    est = gc.fisher_diagonal(model, loss_fn, (X.repeat(40, 1), y.repeat(40)), kind="mc",
                             likelihood="categorical", mc_samples=10, generator=0)
    std = (var_n.sum(0) / R).sqrt() / N
    assert ((_cat(est, model) - ggn_diag).abs() <= 4 * std + 1e-12).all()


def test_mc_fisher_gaussian_converges_to_ggn(mlp_mse):
    """For loss c‖f−y‖², g_i ~ N(0, E_i) per example, so Var(g_i²) = 2E_i²: tolerance 4σ."""
    model, loss_fn, X, y = mlp_mse
    N = X.shape[0]
    theta, unflat, _ = flat_params(model)
    J = jacrev(lambda t: functional_call(model, unflat(t), (X,)))(theta)  # (N, D, P)
    c = 1 / J.shape[1]
    per_ex = 2 * c * (J ** 2).sum(1)                                     # (N, P) GGN diag per example
    torch.testing.assert_close(per_ex.mean(0), reference_ggn(model, loss_fn, X, y).diagonal(), atol=TOL, rtol=0)
    R = 400
    est = gc.fisher_diagonal(model, loss_fn, (X.repeat(40, 1), y.repeat(40, 1)), kind="mc",
                             likelihood="gaussian", mc_samples=10, generator=torch.Generator().manual_seed(1))
    std = (2 * (per_ex ** 2).sum(0) / R).sqrt() / N
    assert ((_cat(est, model) - per_ex.mean(0)).abs() <= 4 * std + 1e-12).all()


def _naive_kfac(model, loss_fn, X, y):
    """Per-example loop: layer inputs a (with 1 for the bias) and output gradients δ of ℓ_b."""
    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    A = {n: 0 for n in lins}
    G = {n: 0 for n in lins}
    for b in range(X.shape[0]):
        store = {}
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, (i[0], o)))
                 for n, m in lins.items()]
        loss = loss_fn(model(X[b: b + 1]), y[b: b + 1])[0]
        for h in hooks:
            h.remove()
        outs = torch.autograd.grad(loss, [store[n][1] for n in lins])
        for (n, m), d in zip(lins.items(), outs):
            a = store[n][0][0].detach()
            a = torch.cat([a, a.new_ones(1)]) if m.bias is not None else a
            A[n] = A[n] + torch.outer(a, a) / X.shape[0]
            G[n] = G[n] + torch.outer(d[0], d[0]) / X.shape[0]
    return A, G


def test_kfac_equals_naive_factors_and_products(case):
    model, loss_fn, X, y = case
    A, G = _naive_kfac(model, loss_fn, X, y)
    kf = gc.kfac(model, loss_fn, [(X[:4], y[:4]), (X[4:], y[4:])])
    assert list(kf) == list(A)
    for n in kf:
        torch.testing.assert_close(kf[n][0], A[n], atol=TOL, rtol=0)
        torch.testing.assert_close(kf[n][1], G[n], atol=TOL, rtol=0)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    kv = kf.matvec(v)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            M = torch.cat([v[f"{n}.weight"], v[f"{n}.bias"][:, None]], 1)
            ref = (torch.kron(G[n], A[n]) @ M.reshape(-1)).view_as(M)
            torch.testing.assert_close(kv[f"{n}.weight"], ref[:, :-1], atol=TOL, rtol=0)
            torch.testing.assert_close(kv[f"{n}.bias"], ref[:, -1], atol=TOL, rtol=0)
            damp = 1e-2 ** 0.5
            Md = torch.cat([*[kf.inverse_matvec(v, damping=1e-2)[f"{n}.{k}"].reshape(M.shape[0], -1)
                              for k in ("weight", "bias")]], 1)
            eye = lambda k: torch.eye(k, dtype=M.dtype)
            back = torch.kron(G[n] + damp * eye(G[n].shape[0]), A[n] + damp * eye(A[n].shape[0])) @ Md.reshape(-1)
            torch.testing.assert_close(back, M.reshape(-1), atol=1e-8, rtol=0)


def test_kfac_is_exact_for_one_example_one_layer():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    X, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2])
    g = naive_per_example_grads(model, classification_loss, X, y)
    order = torch.cat([g["weight"][0], g["bias"][0][:, None]], 1).reshape(-1)  # row-major [W | b]
    F = torch.outer(order, order)
    dense = gc.kfac(model, classification_loss, (X, y)).to_dense()
    perm = torch.arange(15).view(3, 5)  # layout: weight (3·4) then bias (3) -> row-major [W | b]
    idx = torch.cat([perm[:, :4].reshape(-1), perm[:, 4]])
    torch.testing.assert_close(dense, F[idx][:, idx], atol=TOL, rtol=0)


def test_mc_kfac_and_errors(mlp_ce):
    model, loss_fn, X, y = mlp_ce
    kf = gc.kfac(model, loss_fn, (X, y), kind="mc", likelihood="categorical", generator=0)
    assert kf["2"][1].shape == (3, 3)
    with pytest.raises(gc.CurvatureError, match="likelihood"):
        gc.fisher_diagonal(model, loss_fn, (X, y), kind="mc")
    with pytest.raises(gc.CurvatureError, match="squared-error"):
        gc.sample_targets(torch.zeros(2, 3), lambda f, t: (f - t).sum(-1), "gaussian", torch.Generator())
