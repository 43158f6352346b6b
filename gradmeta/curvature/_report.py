"""A per-layer curvature summary of a model: the engine behind ``gradmeta curvature`` and the notebook."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from . import _estimators as est
from ._data import layer_groups
from ._fisher import fisher_diagonal
from ._operators import HessianOperator


def mse_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error over all non-batch axes: ``(B, ...) -> (B,)``."""
    return ((outputs - targets.to(outputs.dtype).view_as(outputs)) ** 2).flatten(1).mean(1)


def cross_entropy_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy on logits ``(B, C)`` or ``(B, T, C)`` (mean over tokens) -> ``(B,)``."""
    B = outputs.shape[0]
    ce = nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="none")
    return ce.view(B, -1).mean(1)


LOSSES = {"cross_entropy": cross_entropy_per_example, "mse": mse_per_example}


def curvature_report(model: nn.Module, loss_fn, data, *, num_samples: int = 100, exact_below: int = 256,
                     eig_tol: float = 1e-4, max_matvecs: int = 100, slq_probes: int = 4, slq_steps: int = 40,
                     generator=0, eval_batchnorm: bool = False) -> dict:
    """Per-layer trace, top eigenvalue, Fisher trace and condition estimate of the mean-loss Hessian.

    One ``HessianOperator`` (gradient graphs stored once) serves every layer block and the full
    model. A block with at most ``exact_below`` parameters gets its exact trace; larger ones a
    ``num_samples``-probe Hutchinson estimate. The top eigenvalue is Lanczos to relative residual
    ``eig_tol``. "condition" is ``λ_max / (trace / n)``, top over mean eigenvalue: a cheap spread
    measure (a lower bound on the condition number when the block is positive semi-definite).

    Returns:
        A JSON-ready dict: ``layers`` (rows of ``layer, params, trace, trace_method, top_eigenvalue,
        eig_matvecs, fisher_trace, condition``), ``model`` (the same for all parameters),
        ``density`` (SLQ ``grid``/``density`` lists), ``seconds`` and ``num_matvecs``.
    """
    t0 = time.perf_counter()
    op = HessianOperator(model, loss_fn, data, eval_batchnorm=eval_batchnorm)
    gen = est._gen(generator, op.device)
    fisher = fisher_diagonal(model, loss_fn, data, eval_batchnorm=eval_batchnorm)
    from ._api import _exact_diag

    def row(name, A, names):
        n = A.shape[0]
        if n <= exact_below:
            trace, how = _exact_diag(A).sum().item(), "exact"
        else:
            trace, how = est.hutchinson_trace(A, num_samples, gen).item(), f"hutchinson({num_samples})"
        eig = est.top_eigenvalues(A, 1, tol=eig_tol, max_matvecs=max_matvecs, generator=gen)
        top = eig.eigenvalues[0].item()
        mean = trace / n
        return {"layer": name, "params": n, "trace": trace, "trace_method": how, "top_eigenvalue": top,
                "eig_matvecs": eig.num_matvecs,
                "fisher_trace": float(sum(fisher[k].sum().item() for k in names)),
                "condition": top / mean if mean > 0 else math.nan}

    blocks = [(layer, op.block(names), names) for layer, names in layer_groups(op.layout).items()]
    layers = [row(*b) for b in blocks]
    whole = row("(all)", op, list(op.layout.names))
    sd = est.slq(op, slq_probes, slq_steps, generator=gen)
    matvecs = op.num_matvecs + sum(b.num_matvecs for _, b, _ in blocks)
    return {"layers": layers, "model": whole, "num_data": op.num_data,
            "density": {"grid": sd.grid.tolist(), "density": sd.density.tolist(), "sigma": sd.sigma,
                        "num_probes": slq_probes, "num_steps": slq_steps},
            "num_matvecs": matvecs, "seconds": time.perf_counter() - t0, "_spectral_density": sd}


def format_table(report: dict) -> str:
    """Plain-text table of a ``curvature_report`` (one row per layer, then the whole model)."""
    cols = [("layer", "layer"), ("params", "params"), ("trace", "trace"), ("trace_method", "trace via"),
            ("top_eigenvalue", "top eig"),
            ("fisher_trace", "Fisher trace"), ("condition", "cond. est.")]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [[fmt(r[k]) for k, _ in cols] for r in [*report["layers"], report["model"]]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (_, h) in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line([h for _, h in cols]), line(["-" * w for w in widths]), *map(line, rows[:-1]),
           line(["-" * w for w in widths]), line(rows[-1])]
    return "\n".join(out)
