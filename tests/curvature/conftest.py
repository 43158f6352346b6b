"""Shared references for the curvature tests: tiny float64 models and slow, obvious dense matrices."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from gradmeta.models import GPT, classification_loss, lm_loss, mlp


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and several test processes may share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mse_loss(outputs, targets):
    return ((outputs - targets) ** 2).mean(-1)


def _mlp_ce(seed=0, n=12):
    torch.manual_seed(seed)
    model = mlp([4, 5, 3], activation="tanh").double()
    X = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, classification_loss, X, y


def _mlp_mse(seed=1, n=10):
    torch.manual_seed(seed)
    model = mlp([3, 6, 2], activation="sigmoid").double()
    X = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randn(n, 2, dtype=torch.float64)
    return model, mse_loss, X, y


def _gpt(seed=2, n=3):
    torch.manual_seed(seed)
    model = GPT(vocab=5, d_model=4, n_heads=2, n_blocks=1, max_len=4, d_ff=6).double()
    X = torch.randint(0, 5, (n, 4))
    y = torch.randint(0, 5, (n, 4))
    return model, lm_loss, X, y


CASES = {"mlp_ce": _mlp_ce, "mlp_mse": _mlp_mse}


@pytest.fixture(params=list(CASES))
def case(request):
    """(model, loss_fn, X, y) for each tiny float64 MLP (dense references are cheap for these)."""
    return CASES[request.param]()


@pytest.fixture
def gpt():
    """A tiny GPT (223 parameters); tested through single products, dense references are slow on CPU."""
    return _gpt()


@pytest.fixture
def mlp_ce():
    return _mlp_ce()


@pytest.fixture
def mlp_mse():
    return _mlp_mse()


def flat_params(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]

    def unflat(t):
        out, s = {}, 0
        for n, sh in zip(names, shapes):
            out[n] = t[s: s + sh.numel()].view(sh)
            s += sh.numel()
        return out

    return theta, unflat, names


def reference_hessian(model, loss_fn, X, y):
    """Dense (P, P) Hessian of the mean loss: one double-backward per row of the full gradient.

    (torch.func.hessian is cross-checked against this for the MLPs in test_curv_operators; for the GPT
    it disagrees in torch 2.13 while this reference agrees with finite differences, see that test.)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss_fn(model(X), y).mean(), params, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in g])
    rows = []
    for i in range(g.numel()):
        r = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1)
                               for t, p in zip(r, params)]))
    return torch.stack(rows)


def functorch_hessian(model, loss_fn, X, y):
    """torch.func.hessian (forward-over-reverse) of a flat-parameter function."""
    theta, unflat, _ = flat_params(model)
    return hessian(lambda t: loss_fn(functional_call(model, unflat(t), (X,)), y).mean())(theta)


def finite_difference_columns(model, loss_fn, X, y, cols, h=1e-5):
    """Columns of the Hessian by central differences of the autograd gradient (float64)."""
    theta, unflat, _ = flat_params(model)

    def grad_at(t):
        return jacrev(lambda t: loss_fn(functional_call(model, unflat(t), (X,)), y).mean())(t)

    out = []
    for j in cols:
        e = torch.zeros_like(theta)
        e[j] = h
        out.append((grad_at(theta + e) - grad_at(theta - e)) / (2 * h))
    return torch.stack(out, 1)


def reference_ggn(model, loss_fn, X, y):
    """Dense GGN (1/N) Σ_n J_nᵀ H_n J_n from the full output Jacobian and per-example output Hessians."""
    theta, unflat, _ = flat_params(model)
    out = functional_call(model, unflat(theta), (X,)).detach()
    J = jacrev(lambda t: functional_call(model, unflat(t), (X,)))(theta)  # (B, *out, P)
    G = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for b in range(X.shape[0]):
        Hb = hessian(lambda f: loss_fn(f[None], y[b: b + 1])[0])(out[b])
        Jb = J[b].reshape(-1, theta.numel())
        G += Jb.T @ Hb.reshape(Jb.shape[0], Jb.shape[0]) @ Jb
    return G / X.shape[0]


def naive_per_example_grads(model, loss_fn, X, y):
    """{param_name: (B, *shape)} by one autograd call per example."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(X.shape[0]):
        loss = loss_fn(model(X[b: b + 1]), y[b: b + 1])[0]
        rows.append(torch.autograd.grad(loss, params))
    return {n: torch.stack([r[i] for r in rows]) for i, n in enumerate(names)}


def naive_hvp(model, loss_fn, X, y, v):
    """H v by a fresh double-backward of ⟨∇L, v⟩ (v flat, named_parameters order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss_fn(model(X), y).mean(), params, create_graph=True)
    gv = sum((t.reshape(-1) * vi).sum() for t, vi in zip(g, v.split([p.numel() for p in params])))
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad(gv, params)])


def naive_ggn_vp(model, loss_fn, X, y, v):
    """(1/N) Σ_n J_nᵀ H_n J_n v with forward-mode J v, per-example output Hessians and a vjp."""
    theta, unflat, _ = flat_params(model)
    f = lambda t: functional_call(model, unflat(t), (X,))
    out, jv = torch.func.jvp(f, (theta,), (v,))
    hjv = torch.stack([(hessian(lambda o: loss_fn(o[None], y[b: b + 1])[0])(out[b].detach())
                        .reshape(out[b].numel(), -1) @ jv[b].reshape(-1)).view_as(out[b])
                       for b in range(X.shape[0])])
    _, vjp = torch.func.vjp(f, theta)
    return vjp(hjv)[0] / X.shape[0]
