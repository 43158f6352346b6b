"""Cross-checks with the real peers: curvlinops (HVP, GGN-vp, trace) and PyHessian (top eigenvalue)."""
import torch
from torch import nn

from gradmeta import curvature as gc

import curvlinops  # the `peers` extra; `make env` installs it
import pyhessian

from tests.curvature.conftest import _mlp_ce, mse_loss


def _peer_loss(loss_fn):
    return nn.MSELoss() if loss_fn is mse_loss else nn.CrossEntropyLoss()


def test_hvp_ggn_and_trace_match_curvlinops(case):
    model, loss_fn, X, y = case
    data = [(X[:5], y[:5]), (X[5:], y[5:])]
    params = [p for p in model.parameters()]
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    H_c = curvlinops.HessianLinearOperator(model, _peer_loss(loss_fn), params, data)
    G_c = curvlinops.GGNLinearOperator(model, _peer_loss(loss_fn), params, data)
    H = gc.HessianOperator(model, loss_fn, data)
    torch.testing.assert_close(H @ v, H_c @ v, atol=1e-10, rtol=0)
    torch.testing.assert_close(gc.GGNOperator(model, loss_fn, data) @ v, G_c @ v, atol=1e-10, rtol=0)
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(gc.hessian_trace(model, loss_fn, data, method="exact"), (H_c @ eye).trace(),
                               atol=1e-10, rtol=0)


def test_top_eigenvalue_matches_pyhessian():
    model, loss_fn, X, y = _mlp_ce(n=32)
    model = model.float()
    X = X.float()
    ours = gc.hessian_eigenvalues(model, loss_fn, (X, y), k=1, tol=1e-6)
    torch.manual_seed(0)
    ph = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
    top, _ = ph.eigenvalues(maxIter=500, tol=1e-7, top_n=1)
    for p in model.parameters():
        p.grad = None  # PyHessian leaves create_graph gradients on the parameters
    assert abs(ours.item() - top[0]) <= 1e-4 * abs(top[0])
