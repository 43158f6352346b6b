"""Hessian and generalised Gauss-Newton operators of the mean loss of a model over data.

HVP route (measured, ``benchmarks/curvature.py``): one forward+backward per batch with
``create_graph=True`` builds the gradient graph once; every product is then a single backward
through that stored graph (as PyHessian does for one batch). This beats a fresh double-backward
per product and ``torch.func.jvp(grad(...))`` because the forward and first backward are paid once.
The price is memory: the graph of every batch is kept while the operator lives
(``reuse_graph=False`` recomputes it per product instead).
"""
from __future__ import annotations

import torch
from torch import nn

from ._data import batch_size, batches, call_model, checked, mean_loss, output_tensor, trainable
from ._linop import LinearOperator


def _grad(outputs, inputs, grad_outputs, retain=True, create=False):
    """``autograd.grad`` that returns zeros for inputs the outputs do not depend on."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    res = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                              retain_graph=retain, create_graph=create, allow_unused=True)
    return [torch.zeros_like(x) if r is None else r for x, r in zip(inputs, res)]


class _CurvatureOperator(LinearOperator):
    """Shared set-up: parameters, data split into batches, and the flat parameter layout."""

    def __init__(self, model: nn.Module, loss_fn, data, param_names=None, *,
                 reuse_graph: bool = True, eval_batchnorm: bool = False):
        self.model, self.loss_fn = model, loss_fn
        self.params, self.layout = trainable(model, param_names)
        self.batches = batches(data)
        self.num_data = sum(batch_size(x) for x, _ in self.batches)
        self.reuse_graph, self.eval_batchnorm = reuse_graph, eval_batchnorm
        p = self.params[0]
        super().__init__(self.layout.size, p.dtype, p.device)
        self._cache: list | None = None
        if reuse_graph:
            self._cache = [self._build(x, y) for x, y in self.batches]

    def _build(self, x, y):
        raise NotImplementedError

    def _apply(self, state, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _states(self):
        if self._cache is not None:
            yield from self._cache
        else:
            for x, y in self.batches:
                yield self._build(x, y)

    def _matvec(self, v):
        vs = self.layout.split(v)
        total = None
        for state in self._states():
            out = self._apply(state, vs)
            total = out if total is None else [t + o for t, o in zip(total, out)]
        return torch.cat([t.reshape(-1) for t in total]).detach()

    def release(self) -> None:
        """Drop the stored graphs (the operator keeps working, recomputing them per product)."""
        self._cache, self.reuse_graph = None, False


class HessianOperator(_CurvatureOperator):
    """Hessian of the mean loss ``(1/N) Σ_n ℓ_n`` over all of ``data`` w.r.t. the trainable parameters.

    Args:
        model: any ``nn.Module``; its trainable parameters (or ``param_names``) are flattened in
            ``named_parameters()`` order into vectors of length ``P``.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-example losses.
        data: an ``(inputs, targets)`` pair or an iterable of pairs; batches are weighted by size.
        param_names: optional subset of parameter names (the Hessian block of those parameters).
        reuse_graph: keep each batch's gradient graph for all products (fast, more memory).
        eval_batchnorm: run BatchNorm modules in eval mode instead of raising.
    """

    def _build(self, x, y):
        with checked(self.model, self.eval_batchnorm):
            _, loss = mean_loss(self.model, self.loss_fn, x, y, self.num_data)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return list(grads)

    def _apply(self, grads, vs):
        return _grad(grads, self.params, vs, retain=self.reuse_graph)

    def block(self, param_names) -> "HessianOperator":
        """The diagonal block of the given parameters, sharing this operator's stored graphs."""
        sub = object.__new__(HessianOperator)
        names = list(param_names)
        idx = [self.layout.names.index(n) for n in names if n in self.layout.names]
        if len(idx) != len(names):
            raise KeyError(f"{sorted(set(names) - set(self.layout.names))} are not parameters of this operator")
        idx.sort()
        sub.__dict__.update(self.__dict__)
        sub.params = [self.params[i] for i in idx]
        from ..params import ParamLayout
        sub.layout = ParamLayout(tuple(self.layout.names[i] for i in idx),
                                 tuple(self.layout.shapes[i] for i in idx))
        if self._cache is not None:
            sub._cache = [[g[i] for i in idx] for g in self._cache]
        else:  # recompute the full gradient per product, keep the block
            sub._build = lambda x, y: [HessianOperator._build(self, x, y)[i] for i in idx]
        LinearOperator.__init__(sub, sub.layout.size, self.dtype, self.device)
        return sub

    def gradient(self) -> torch.Tensor:
        """The mean-loss gradient ``(P,)`` (a by-product of the stored graphs)."""
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for grads in self._states():
            total += torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.detach().reshape(-1)
                                for g, p in zip(grads, self.params)])
        return total


class GGNOperator(_CurvatureOperator):
    """Generalised Gauss-Newton ``(1/N) Σ_n J_nᵀ H_n J_n`` of the mean loss (``H_n``: the Hessian of
    ``ℓ_n`` w.r.t. the model output, ``J_n``: the output Jacobian). Same arguments as ``HessianOperator``.

    ``J v`` uses the double-backward trick (``Jv = ∂/∂u ⟨Jᵀu, v⟩``), so all three products are
    backward passes through graphs stored once per batch.
    """

    def _build(self, x, y):
        with checked(self.model, self.eval_batchnorm):
            outputs, rebuild = output_tensor(call_model(self.model, x))
        f = outputs.detach().requires_grad_(True)
        losses = self.loss_fn(rebuild(f), y)
        if losses.ndim != 1 or losses.shape[0] != batch_size(x):
            raise ValueError(f"loss_fn must return per-example losses of shape (B,), got {tuple(losses.shape)}")
        (gf,) = torch.autograd.grad(losses.sum() / self.num_data, f, create_graph=True)
        u = torch.zeros_like(outputs, requires_grad=True)
        jtu = torch.autograd.grad(outputs, self.params, u, create_graph=True, allow_unused=True)
        return outputs, f, gf, u, list(jtu)

    def _apply(self, state, vs):
        outputs, f, gf, u, jtu = state
        keep = self.reuse_graph
        (jv,) = _grad(jtu, [u], vs, retain=True)
        (hjv,) = _grad([gf], [f], [jv], retain=True)
        return _grad([outputs], self.params, [hjv], retain=keep)
