"""Curvature of the mean loss of any model over data.

    from gradmeta import curvature as gc
    gc.hvp(model, loss_fn, data, v)                       # v, result: {param_name: tensor}
    gc.hessian_trace(model, loss_fn, data, method="hutch++")
    gc.hessian_eigenvalues(model, loss_fn, data, k=3)     # Lanczos, largest algebraic
    gc.fisher_diagonal(model, loss_fn, data, kind="mc", likelihood="categorical")

``data`` is an ``(inputs, targets)`` pair or an iterable of pairs (weighted by size); ``loss_fn``
returns per-example losses ``(B,)``. Operators (``HessianOperator``, ``GGNOperator``) act on flat
vectors in ``named_parameters()`` order; the estimators accept any operator or a dense tensor.
"""
from ._api import (EXACT_WARN_PARAMS, exact_hessian, ggn_vp, hessian_diagonal, hessian_eigenvalues,
                   hessian_trace, hvp, spectral_density)
from ._data import CurvatureError
from ._estimators import (EigenResult, SpectralDensity, hutchinson_diagonal, hutchinson_trace, hutchpp_trace,
                          lanczos, slq, top_eigenvalues)
from ._fisher import KFAC, fisher_diagonal, kfac, sample_targets
from ._linop import DenseOperator, LinearOperator, as_operator
from ._trace import fisher_trace, rao_blackwell_trace, standard_trace
from ..params import ParamLayout
from ._operators import GGNOperator, HessianOperator
from ._report import curvature_report, format_table

__all__ = [
    "hvp", "ggn_vp", "exact_hessian", "hessian_trace", "hessian_diagonal", "hessian_eigenvalues",
    "spectral_density", "fisher_diagonal", "kfac", "KFAC", "sample_targets",
    "LinearOperator", "DenseOperator", "ParamLayout", "as_operator", "HessianOperator", "GGNOperator",
    "hutchinson_trace", "hutchpp_trace", "hutchinson_diagonal", "lanczos", "top_eigenvalues", "slq",
    "EigenResult", "SpectralDensity", "CurvatureError", "EXACT_WARN_PARAMS", "curvature_report", "format_table",
    "fisher_trace", "standard_trace", "rao_blackwell_trace",
]
