"""functional_factors: equal to the hooks path, pure in the parameters, vmap-able over inner models."""
import pytest
import torch
from torch import nn

import gradmeta as gm
from gradmeta.grads import functional_factors
from gradmeta.models import classification_loss, mlp
from tests.conftest import assert_dicts_close, flatten_params, naive_per_example_grads
from tests.grads.models import cases

CASES = cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_functional_equals_hooks_path(name):
    model, loss_fn, x, y = CASES[name]
    params = {n: p.detach() for n, p in model.named_parameters()}
    got = functional_factors(model, loss_fn, params, x, y)
    want = gm.collect_gradients(model, loss_fn, x, y)
    assert got.layer_names == want.layer_names
    for n in want.layer_names:
        if want[n].module_type != "Embedding":
            torch.testing.assert_close(got[n].activations, want[n].activations, atol=1e-12, rtol=0)
        torch.testing.assert_close(got[n].backprops, want[n].backprops, atol=1e-12, rtol=0)
    assert_dicts_close(got.per_example_grads(), naive_per_example_grads(model, loss_fn, x, y))


class _WithPos(nn.Module):
    """A raw position parameter (exact fallback) and a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.pos = nn.Parameter(torch.randn(5, 4))
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 9, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.lin(self.emb(idx) + self.pos)).mean(1))


def _sets(model, k=3):
    return [{n: p.detach() + 0.3 * torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(k)]


@pytest.mark.parametrize("which", ["mlp", "pos_tied"])
def test_vmap_over_parameter_sets_equals_a_loop(which):
    if which == "mlp":
        model, x, y = mlp([5, 7, 3]).double(), torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    else:
        model, x, y = _WithPos().double(), torch.randint(0, 9, (4, 5)), torch.randint(0, 9, (4,))
    sets = _sets(model)
    stacked = {n: torch.stack([s[n] for s in sets]) for n in sets[0]}

    def stats(p):
        gs = functional_factors(model, classification_loss, p, x, y)
        return gs.per_example_grads(), gs.grad_norms(), gs.gram()

    pe, norms, gram = torch.func.vmap(stats)(stacked)
    for i, s in enumerate(sets):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(s[n])
        want = naive_per_example_grads(model, classification_loss, x, y)
        flat = flatten_params(want)
        assert_dicts_close({k: v[i] for k, v in pe.items()}, want)
        torch.testing.assert_close(norms[i], flat.norm(dim=1), atol=1e-10, rtol=0)
        torch.testing.assert_close(gram[i], flat @ flat.T, atol=1e-10, rtol=0)


def test_functional_is_differentiable_in_the_parameters():
    model, x, y = mlp([5, 6, 3]).double(), torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    f = lambda p: functional_factors(model, classification_loss, p, x, y).grad_norms().sum()  # noqa: E731
    g = torch.func.grad(f)(params)
    eps = 1e-6
    d = {n: torch.randn_like(p) for n, p in params.items()}
    fd = (f({n: p + eps * d[n] for n, p in params.items()}) - f({n: p - eps * d[n] for n, p in params.items()})) / (2 * eps)
    torch.testing.assert_close(sum((g[n] * d[n]).sum() for n in g), fd, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("which", ["mlp", "pos_tied"])
def test_structure_cache_gives_the_same_factors_and_runs_the_structure_pass_once_per_shape(which, monkeypatch):
    """With ``structure_cache`` the factors equal those without it (vmapped over parameter sets,
    and for a second batch shape), and the structure pass runs once per batch shape."""
    import gradmeta.grads._functional as F

    if which == "mlp":
        model = mlp([5, 7, 3]).double()
        batch = lambda B: (torch.randn(B, 5, dtype=torch.float64), torch.randint(0, 3, (B,)))  # noqa: E731
    else:
        model = _WithPos().double()
        batch = lambda B: (torch.randint(0, 9, (B, 5)), torch.randint(0, 9, (B,)))  # noqa: E731
    sets = _sets(model)
    stacked = {n: torch.stack([s[n] for s in sets]) for n in sets[0]}
    passes = []
    make_plan = F.make_plan
    monkeypatch.setattr(F, "make_plan", lambda *a, **k: passes.append(1) or make_plan(*a, **k))
    cache = {}

    def stats(p, x, y, cache):
        gs = functional_factors(model, classification_loss, p, x, y, structure_cache=cache)
        return gs.per_example_grads(), gs.losses

    for B in (4, 4, 6, 4):
        x, y = batch(B)
        got = torch.func.vmap(lambda p: stats(p, x, y, cache))(stacked)
        want = torch.func.vmap(lambda p: stats(p, x, y, None))(stacked)
        assert_dicts_close(got[0], want[0], atol=0)
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    # without the cache: one structure pass per call (4 calls); with it: one per batch shape (2)
    assert len(passes) == 4 + 2 and len(cache) == 2


def test_structure_cache_stays_bounded_with_a_new_loss_function_at_every_call():
    model, x, y = mlp([5, 7, 3]).double(), torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    cache = {}
    want = functional_factors(model, classification_loss, params, x, y).per_example_grads()
    for _ in range(40):
        got = functional_factors(model, lambda o, t: classification_loss(o, t), params, x, y, structure_cache=cache)
        assert len(cache) <= 32
    assert_dicts_close(got.per_example_grads(), want, atol=0)
