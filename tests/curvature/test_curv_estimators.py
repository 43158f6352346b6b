"""Trace, diagonal, Lanczos and SLQ estimators: on dense matrices and on exact Hessians (float64).

Stochastic estimators are checked against stated tolerances derived from their variance:
Hutchinson with Rademacher probes has Var = 2(‖A‖_F² − Σ A_ii²)/m, the diagonal estimator
Var_i = Σ_{j≠i} A_ij² / m; we require the error at a fixed seed to be within 4 standard deviations.
"""
import math

import pytest
import torch

from gradmeta import curvature as gc

from tests.curvature.conftest import reference_hessian


def _sym(n, seed=0, decay=None):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.randn(n, generator=g, dtype=torch.float64) if decay is None else \
        decay ** torch.arange(n, dtype=torch.float64) * torch.sign(torch.randn(n, generator=g, dtype=torch.float64))
    return (Q * lam) @ Q.T


def _hutch_std(A, m):
    return math.sqrt(2 * ((A ** 2).sum() - (A.diagonal() ** 2).sum()) / m)


@pytest.mark.parametrize("m", [100, 1000])
def test_hutchinson_trace_within_stated_tolerance(m):
    A = _sym(40)
    est = gc.hutchinson_trace(A, m, generator=0)
    assert abs(est - A.trace()) <= 4 * _hutch_std(A, m)


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    A = _sym(200, decay=0.8)  # numerical rank ~ 60: the sketch captures most of the trace
    m = 99
    err_pp = abs(gc.hutchpp_trace(A, m, generator=0) - A.trace())
    assert err_pp <= 4 * _hutch_std(A, m) / 10
    assert abs(gc.hutchpp_trace(_sym(30), 90, generator=1) - _sym(30).trace()) < 1e-10  # sketch = whole space


def test_hutchinson_diagonal_within_stated_tolerance():
    A, m = _sym(30, seed=3), 2000
    d = gc.hutchinson_diagonal(A, m, generator=0)
    std = (((A ** 2).sum(1) - A.diagonal() ** 2) / m).sqrt()
    assert ((d - A.diagonal()).abs() <= 4 * std).all()


def test_lanczos_top_k_dense():
    A = _sym(300, seed=5)
    r = gc.top_eigenvalues(A, k=4, tol=1e-9, max_matvecs=300, generator=0, return_eigenvectors=True)
    torch.testing.assert_close(r.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:4], atol=1e-6, rtol=0)
    assert r.num_matvecs <= 300
    X = r.eigenvectors
    assert (A @ X - X * r.eigenvalues).norm(dim=0).max() < 1e-6


def test_model_trace_diagonal_eigenvalues(case):
    model, loss_fn, X, y = case
    data = (X, y)
    H = reference_hessian(model, loss_fn, X, y)
    P = H.shape[0]
    torch.testing.assert_close(gc.hessian_trace(model, loss_fn, data, method="exact"), H.trace(), atol=1e-10, rtol=0)
    m = 1000
    est = gc.hessian_trace(model, loss_fn, data, num_samples=m, generator=0)
    assert abs(est - H.trace()) <= 4 * _hutch_std(H, m)
    assert abs(gc.hessian_trace(model, loss_fn, data, num_samples=3 * P, method="hutch++") - H.trace()) < 1e-9
    d = gc.hessian_diagonal(model, loss_fn, data, method="exact")
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in d.values()]), H.diagonal(), atol=1e-10, rtol=0)
    ev = gc.hessian_eigenvalues(model, loss_fn, data, k=3, max_matvecs=P)
    torch.testing.assert_close(ev, torch.linalg.eigvalsh(H).flip(0)[:3], atol=1e-6, rtol=0)


def test_per_layer_blocks_and_eigenvectors(mlp_ce):
    model, loss_fn, X, y = mlp_ce
    H = reference_hessian(model, loss_fn, X, y)
    sl = {"0": slice(0, 25), "2": slice(25, 43)}
    tr = gc.hessian_trace(model, loss_fn, (X, y), method="exact", per_layer=True)
    ev = gc.hessian_eigenvalues(model, loss_fn, (X, y), k=2, per_layer=True, max_matvecs=50)
    for name, s in sl.items():
        torch.testing.assert_close(tr[name], H[s, s].trace(), atol=1e-10, rtol=0)
        torch.testing.assert_close(ev[name], torch.linalg.eigvalsh(H[s, s]).flip(0)[:2], atol=1e-6, rtol=0)
    vals, vecs = gc.hessian_eigenvalues(model, loss_fn, (X, y), k=2, return_eigenvectors=True, max_matvecs=43)
    assert vecs["0.weight"].shape == (2, 5, 4)
    flat = torch.cat([t.reshape(2, -1) for t in vecs.values()], 1).T
    assert (H @ flat - flat * vals).norm(dim=0).max() < 1e-6


def test_slq_nodes_and_density(tmp_path, mlp_ce):
    A = _sym(25, seed=7)
    sd = gc.slq(A, num_probes=3, num_steps=25, generator=0)
    lam = torch.linalg.eigvalsh(A)
    for p in range(3):  # a full Krylov space: the nodes are the eigenvalues, weights sum to one
        torch.testing.assert_close(sd.nodes[p].sort().values, lam, atol=1e-8, rtol=0)
        torch.testing.assert_close(sd.weights[p].sum(), torch.tensor(1.0, dtype=torch.float64))
    dx = sd.grid[1] - sd.grid[0]
    assert abs(sd.density.sum() * dx - 1) < 1e-3
    assert sd.num_matvecs == 75
    model, loss_fn, X, y = mlp_ce
    sdm = gc.spectral_density(model, loss_fn, (X, y), num_probes=2, num_steps=10)
    sdm.plot(path=tmp_path / "density.png")
    assert (tmp_path / "density.png").stat().st_size > 1000
