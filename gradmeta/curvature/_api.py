"""Functional entry points: ``(model, loss_fn, data) -> curvature``, vectors as ``{param_name: tensor}``.

All quantities are of the MEAN loss ``(1/N) Σ_n ℓ_n`` over ``data`` (an ``(inputs, targets)`` pair or
an iterable of pairs, weighted by batch size), w.r.t. the trainable parameters in
``named_parameters()`` order.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import _estimators as est
from ._data import CurvatureError, layer_groups
from ._operators import GGNOperator, HessianOperator

#: ``exact_hessian`` (and ``method="exact"``) warn above this many parameters.
EXACT_WARN_PARAMS = 4096


def _vec_op(op, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    flat = op.layout.flatten({k: t.to(op.dtype) for k, t in v.items()})
    return {k: t.clone() for k, t in op.layout.unflatten(op.matvec(flat)).items()}


def hvp(model: nn.Module, loss_fn, data, v: dict[str, torch.Tensor], *, eval_batchnorm: bool = False):
    """Hessian-vector product of the mean loss.

    Args:
        model: any ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-example losses.
        data: ``(inputs, targets)`` or an iterable of such pairs.
        v: ``{param_name: tensor shaped like the parameter}`` for every trainable parameter.

    Returns:
        ``{param_name: tensor}``, ``H v`` with the same keys and shapes. For many products build a
        ``HessianOperator`` once (the gradient graph is then reused).
    """
    return _vec_op(HessianOperator(model, loss_fn, data, reuse_graph=False, eval_batchnorm=eval_batchnorm), v)


def ggn_vp(model: nn.Module, loss_fn, data, v: dict[str, torch.Tensor], *, eval_batchnorm: bool = False):
    """Generalised Gauss-Newton-vector product ``(1/N) Σ_n J_nᵀ H_n J_n v``; arguments as ``hvp``."""
    return _vec_op(GGNOperator(model, loss_fn, data, reuse_graph=False, eval_batchnorm=eval_batchnorm), v)


def _warn_size(P: int, dtype: torch.dtype, warn_above: int, what: str):
    if P > warn_above:
        mb = P * P * torch.empty((), dtype=dtype).element_size() / 2**20
        warnings.warn(f"{what} of {P} parameters needs {P} Hessian-vector products"
                      f"{f' and {mb:.0f} MiB' if 'matrix' in what else ''} (above warn_above={warn_above}); "
                      f"use method='hutchinson' or a per-layer block instead", RuntimeWarning, stacklevel=3)


def exact_hessian(model: nn.Module, loss_fn, data, *, warn_above: int = EXACT_WARN_PARAMS,
                  eval_batchnorm: bool = False) -> torch.Tensor:
    """The dense Hessian ``(P, P)`` of the mean loss, parameters flattened in ``named_parameters()``
    order; built from ``P`` products with the unit vectors. Warns when ``P > warn_above``."""
    op = HessianOperator(model, loss_fn, data, eval_batchnorm=eval_batchnorm)
    _warn_size(op.shape[0], op.dtype, warn_above, "the exact Hessian matrix")
    H = op.to_dense()
    return (H + H.T) / 2


def _exact_diag(op, chunk: int = 64) -> torch.Tensor:
    n = op.shape[0]
    out = torch.empty(n, dtype=op.dtype, device=op.device)
    for s in range(0, n, chunk):
        E = torch.zeros(n, min(chunk, n - s), dtype=op.dtype, device=op.device)
        E[torch.arange(s, s + E.shape[1]), torch.arange(E.shape[1])] = 1
        out[s: s + E.shape[1]] = op.matmat(E)[s: s + E.shape[1]].diagonal()
    return out


def _blocks(op: HessianOperator, per_layer: bool):
    if not per_layer:
        return {None: op}
    return {layer: op.block(names) for layer, names in layer_groups(op.layout).items()}


def hessian_trace(model: nn.Module, loss_fn, data, num_samples: int = 100, method: str = "hutchinson", *,
                  generator=0, per_layer: bool = False, warn_above: int = EXACT_WARN_PARAMS,
                  eval_batchnorm: bool = False):
    """Trace of the Hessian of the mean loss.

    Args:
        num_samples: products per estimate (per block when ``per_layer``); ignored for ``"exact"``.
        method: ``"hutchinson"`` (Rademacher probes), ``"hutch++"`` or ``"exact"`` (``P`` unit products).
        generator: ``torch.Generator`` or int seed.
        per_layer: return ``{module_name: trace}`` of each layer's diagonal block instead.

    Returns:
        0-dim tensor, or ``{module_name: 0-dim tensor}``.
    """
    op = HessianOperator(model, loss_fn, data, eval_batchnorm=eval_batchnorm)
    gen = est._gen(generator, op.device)
    out = {}
    for name, A in _blocks(op, per_layer).items():
        if method == "exact":
            _warn_size(A.shape[0], A.dtype, warn_above, "the exact trace")
            out[name] = _exact_diag(A).sum()
        elif method == "hutchinson":
            out[name] = est.hutchinson_trace(A, num_samples, gen)
        elif method == "hutch++":
            out[name] = est.hutchpp_trace(A, num_samples, gen)
        else:
            raise CurvatureError(f"method must be 'hutchinson', 'hutch++' or 'exact', got {method!r}")
    return out if per_layer else out[None]


def hessian_diagonal(model: nn.Module, loss_fn, data, num_samples: int = 100, method: str = "hutchinson", *,
                     generator=0, warn_above: int = EXACT_WARN_PARAMS, eval_batchnorm: bool = False):
    """Diagonal of the Hessian: ``{param_name: tensor}``; ``method`` ``"hutchinson"`` or ``"exact"``."""
    op = HessianOperator(model, loss_fn, data, eval_batchnorm=eval_batchnorm)
    if method == "exact":
        _warn_size(op.shape[0], op.dtype, warn_above, "the exact diagonal")
        d = _exact_diag(op)
    elif method == "hutchinson":
        d = est.hutchinson_diagonal(op, num_samples, est._gen(generator, op.device))
    else:
        raise CurvatureError(f"method must be 'hutchinson' or 'exact', got {method!r}")
    return {k: t.clone() for k, t in op.layout.unflatten(d).items()}


def hessian_eigenvalues(model: nn.Module, loss_fn, data, k: int = 1, *, tol: float = 1e-6,
                        max_matvecs: int = 200, generator=0, return_eigenvectors: bool = False,
                        per_layer: bool = False, eval_batchnorm: bool = False):
    """Top-``k`` (largest algebraic) Hessian eigenvalues by Lanczos with full reorthogonalisation.

    Stops when each Ritz residual ``‖Hx − θx‖ ≤ tol·|θ_1|`` or after ``max_matvecs`` products.

    Returns:
        Eigenvalues ``(k,)`` descending; with ``return_eigenvectors`` a pair ``(eigenvalues,
        {param_name: (k, *param.shape)})`` of unit-norm eigenvectors. With ``per_layer``, a dict
        ``{module_name: that result}`` for the diagonal blocks.
    """
    op = HessianOperator(model, loss_fn, data, eval_batchnorm=eval_batchnorm)
    gen = est._gen(generator, op.device)
    out = {}
    for name, A in _blocks(op, per_layer).items():
        r = est.top_eigenvalues(A, min(k, A.shape[0]), tol=tol, max_matvecs=max_matvecs, generator=gen,
                                return_eigenvectors=return_eigenvectors)
        if return_eigenvectors:
            k_found = r.eigenvectors.shape[1]
            vecs = {n: r.eigenvectors[sl].T.reshape(k_found, *shape)
                    for (n, sl), shape in zip(A.layout.slices().items(), A.layout.shapes)}
            out[name] = (r.eigenvalues, vecs)
        else:
            out[name] = r.eigenvalues
    return out if per_layer else out[None]


def spectral_density(model: nn.Module, loss_fn, data, num_probes: int = 4, num_steps: int = 60, *,
                     grid_size: int = 500, sigma: float | None = None, generator=0,
                     eval_batchnorm: bool = False) -> est.SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (``num_probes · num_steps`` products).

    Returns:
        ``SpectralDensity`` with ``grid (G,)``, ``density (G,)``, the quadrature ``nodes``/``weights``
        and ``.plot(path=...)``.
    """
    op = HessianOperator(model, loss_fn, data, eval_batchnorm=eval_batchnorm)
    return est.slq(op, num_probes, num_steps, grid_size=grid_size, sigma=sigma,
                   generator=est._gen(generator, op.device))
