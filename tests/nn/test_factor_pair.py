"""Factor-pair (GL) layers: equivariance / invariance under random well-conditioned R ∈ GL(r)."""
import pytest
import torch

from gradmeta.nn import (FactorPairLinear, FactorPairNet, GLGate, gradient_factor_pairs, pair_product,
                         singular_value_features)


def random_gl(r, g):
    """Well-conditioned random R ∈ GL(r): Q₁ diag(s) Q₂ with s ∈ [0.5, 2] and a random sign."""
    q1, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    s = 0.5 + 1.5 * torch.rand(r, generator=g, dtype=torch.float64)
    return q1 @ torch.diag(s) @ q2


def transform(U, V, R):
    return U @ R, V @ torch.linalg.inv(R).transpose(-1, -2)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("r", [1, 3, 6])
def test_linear_and_gate_equivariant(rng, r):
    torch.manual_seed(0)
    U = torch.randn(5, 2, 7, r, generator=rng, dtype=torch.float64)
    V = torch.randn(5, 2, 4, r, generator=rng, dtype=torch.float64)
    R = random_gl(r, rng)
    lin = FactorPairLinear(7, 4, 6, 3, 2, 3).double()
    for layer in (lin, GLGate()):
        Uo, Vo = layer(U, V)
        Ut, Vt = layer(*transform(U, V, R))
        Ue, Ve = transform(Uo, Vo, R)
        assert rel(Ut, Ue) < 1e-10 and rel(Vt, Ve) < 1e-10
    # the gate really gates (not the identity), and equals the dense O(n m) formula
    Ug, Vg = GLGate()(U, V)
    M = pair_product(U, V)
    assert torch.equal(Ug, U * (M.sum(-1) > 0).unsqueeze(-1))
    assert torch.equal(Vg, V * (M.sum(-2) > 0).unsqueeze(-1))
    assert (Ug == 0).any()


def test_singular_values_match_dense(rng):
    U = torch.randn(3, 9, 4, generator=rng, dtype=torch.float64)
    V = torch.randn(3, 5, 4, generator=rng, dtype=torch.float64)
    dense = torch.linalg.svdvals(U @ V.transpose(-1, -2))
    assert torch.allclose(singular_value_features(U, V, 6), torch.nn.functional.pad(dense[:, :4], (0, 2)), atol=1e-10)


def test_factor_pair_net_invariant_any_rank(rng):
    torch.manual_seed(0)
    shapes = {"a": (7, 5), "b": (3, 7)}
    net = FactorPairNet(shapes, out_dim=2, hidden=4, channels=3).double()
    for r in (1, 2, 5):
        pairs = {k: (torch.randn(6, n, r, generator=rng, dtype=torch.float64),
                     torch.randn(6, m, r, generator=rng, dtype=torch.float64)) for k, (n, m) in shapes.items()}
        out = net(pairs)
        assert out.shape == (6, 2)
        moved = {k: transform(U, V, random_gl(r, rng)) for k, (U, V) in pairs.items()}
        assert rel(net(moved), out) < 1e-8
        # not trivially invariant: changing U Vᵀ changes the output
        other = {k: (U.flip(-2), V) for k, (U, V) in pairs.items()}
        assert rel(net(other), out) > 1e-6


def test_gradient_factor_pairs_are_per_example_grads(refs):
    from gradmeta.models import GPT, lm_loss
    torch.manual_seed(0)
    model = GPT(11, 8, 2, 1, 6, d_ff=12).double()
    idx = torch.randint(0, 11, (3, 6))
    gs = refs.collect(model, idx[:, :5], idx[:, 1:], lm_loss)
    pairs = gradient_factor_pairs(gs)
    pe = gs.per_example_grads()
    for name, (U, V) in pairs.items():
        G = pair_product(U, V)
        w = gs[name].param_names
        assert torch.allclose(G[..., :-1], pe[w["weight"]], atol=1e-12)
        assert torch.allclose(G[..., -1], pe[w["bias"]], atol=1e-12)
    assert "tok" not in pairs and U.shape[-1] == 5
