"""``LearnedRule``: the one interface every learned optimizer satisfies.

A learned rule is a pure update with meta-parameters. Outer trainers (:class:`~gradmeta.lopt.PES`,
:class:`~gradmeta.lopt.ES`, :class:`~gradmeta.lopt.TruncatedBackprop`) and evaluation only call
the methods below, never test what kind of rule they hold:

* ``init_meta(seed) -> meta`` and ``init(params) -> state``;
* ``update(meta, grads, state, params) -> (params, state)``: one step from the mean gradient;
* ``step(task, meta, params, state, batch) -> (params, state, loss)``: one inner step on a task
  batch (by default: the gradient of the mean batch loss, then :meth:`update`; a rule that reads
  more than the mean gradient, e.g. the gradient set, overrides it);
* ``map(fn, in_dims)``: runs ``fn`` over a stack of inner runs (``torch.func.vmap`` by default;
  a rule that is not vmappable loops and stacks);
* ``skipped(state) -> ()`` the number of skipped (non-finite) steps counted in ``state``;
* ``check_differentiable(who)``: raises when backpropagation through the rule's unroll is impossible.

Parameters, gradients and meta-parameters are ``dict[str, Tensor]``; ``state`` is any tree of tensors.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ._baselines import Optimizer

__all__ = ["LearnedRule"]

Params = dict[str, Tensor]


class LearnedRule:
    """Base class of learned optimizers (see the module docstring for the protocol)."""

    def init_meta(self, seed: int = 0) -> Params:
        """Meta-parameters (deterministic in ``seed``)."""
        raise NotImplementedError

    def init(self, params: Params):
        """Fresh optimizer state for ``params``."""
        raise NotImplementedError

    def update(self, meta: Params, grads: Params, state, params: Params) -> tuple[Params, object]:
        """One step from the gradient of the mean batch loss: ``(new_params, new_state)``."""
        raise NotImplementedError

    def step(self, task, meta: Params, params: Params, state, batch: tuple[Tensor, ...]):
        """One inner step on ``batch`` of ``task``: ``(new_params, new_state, mean batch loss ())``."""
        grads, loss = grad_and_value(lambda p: task.loss(p, batch).mean())(params)
        params, state = self.update(meta, grads, state, params)
        return params, state, loss

    def map(self, fn: Callable, in_dims: tuple) -> Callable:
        """``fn`` over a stack of inner runs along the axes ``in_dims`` (results stacked on axis 0)."""
        return vmap(fn, in_dims=in_dims)

    def skipped(self, state) -> Tensor:
        """Number of skipped steps recorded in ``state`` (summed over any leading axes); 0 if not counted."""
        skipped = getattr(state, "skipped", None)
        return skipped.sum() if skipped is not None else torch.zeros(())

    def check_differentiable(self, who: str) -> None:
        """Raise ``ValueError`` naming ``who`` when the unroll cannot be backpropagated through."""

    def bind(self, meta: Params) -> Optimizer:
        """This rule with fixed ``meta`` as an ``init``/``update`` pair like the baselines."""
        return Optimizer(self.init, lambda grads, state, params: self.update(meta, grads, state, params))
