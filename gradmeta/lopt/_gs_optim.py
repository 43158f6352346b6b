"""``GradientSetOptimizer``: learned optimizers that read the batch's gradient set, as a ``torch.optim`` optimizer.

A rule such as :class:`~gradmeta.lopt.GradMetaNetLO` needs more than ``p.grad``: the factored
per-example gradients of the batch. This optimizer therefore runs the forward and backward pass
itself (the rule's ``gradients``: :func:`gradmeta.grads.functional_factors` for GradMetaNet rules),
so its ``step`` needs a closure that returns the batch rather than a loss.

A saved rule (:func:`~gradmeta.lopt.save_checkpoint`) is used with
``GradientSetOptimizer.from_checkpoint(model, loss_fn, path)``, on an MLP of any widths.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

__all__ = ["GradientSetOptimizer"]


class GradientSetOptimizer(torch.optim.Optimizer):
    """Applies a learned rule that reads gradient sets (e.g. :class:`~gradmeta.lopt.GradMetaNetLO`) to ``model``.

    ``step(closure)``: ``closure()`` must return one batch ``(inputs, targets)`` (no forward or
    backward pass: the optimizer runs them). The optimizer computes the gradient set of the
    per-example losses ``loss_fn(model(inputs), targets) -> (B,)`` (of the first ``examples``
    examples if the rule has that setting), writes their mean gradient (whole batch) into
    ``p.grad``, applies one update of ``rule`` with meta-parameters ``meta`` (scaled by the group's
    ``lr``: ``θ ← θ + lr · (rule's step)``), and returns the mean loss (a detached ``()`` tensor).
    ``state_dict`` holds the rule's state as ``"rule_state"`` (its tensors in a fixed order).

    Args:
        model: the module to optimise (every parameter must be trainable and supported by
            :func:`gradmeta.collect_gradients`).
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-example losses.
        rule: a :class:`~gradmeta.lopt.GradMetaNetLO` or :class:`~gradmeta.lopt.WeightSpaceLO`
            (built for any model: it is rebuilt for ``model`` with ``rule.for_model``).
        meta: its meta-parameters.
        lr: multiplier on the rule's step (1: as meta-trained; 0: no movement).

    Raises:
        ValueError: ``model`` is not supported by the rule (e.g. a ``Conv2d`` layer; the message
            names it and says what is supported).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, rule, meta: dict[str, Tensor], lr: float = 1.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradientSetOptimizer needs the nn.Module it optimises, got {type(model).__name__}")
        if not hasattr(rule, "for_model"):
            raise TypeError(f"GradientSetOptimizer runs rules built on the model's structure (GradMetaNetLO, "
                            f"WeightSpaceLO); for a {type(rule).__name__} use LearnedOptimizer(model.parameters())")
        self.model, self.loss_fn, self.rule = model, loss_fn, rule.for_model(model)
        self.meta = {k: v.detach() for k, v in meta.items()}
        self._names = [n for n, _ in model.named_parameters()]
        self._rule_state = None
        super().__init__(list(model.parameters()), {"lr": lr})

    def step(self, closure: Callable[[], tuple[Tensor, Tensor]]) -> Tensor:  # type: ignore[override]
        """One update on the batch ``closure()`` returns; returns the batch's mean loss."""
        if closure is None:
            raise ValueError("GradientSetOptimizer.step needs a closure returning the batch (inputs, targets)")
        batch = closure()
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("GradientSetOptimizer.step: the closure must return the batch (inputs, targets), got "
                             f"{type(batch).__name__}")
        named = dict(self.model.named_parameters())
        params = {n: named[n].detach() for n in self._names}
        with torch.enable_grad():
            grads, gs, loss = self.rule.gradients(self.model, self.loss_fn, params, batch[0], batch[1])
        with torch.no_grad():
            for n, g in grads.items():
                named[n].grad = g.detach().clone()
            if self._rule_state is None:
                self._rule_state = self.rule.init(params)
            new, self._rule_state = self.rule.update(self.meta, grads, self._rule_state, params, gradient_set=gs)
            lr = float(self.param_groups[0]["lr"])
            for n in self._names:
                named[n].add_(new[n] - params[n], alpha=lr) if lr != 1.0 else named[n].copy_(new[n])
        return loss.detach()

    @classmethod
    def from_checkpoint(cls, model: nn.Module, loss_fn: Callable, path, lr: float = 1.0) -> "GradientSetOptimizer":
        """The rule saved at ``path`` (:func:`~gradmeta.lopt.save_checkpoint`), rebuilt for ``model``."""
        from ._optim import load_checkpoint

        rule, meta = load_checkpoint(path, model=model)
        return cls(model, loss_fn, rule, meta, lr=lr)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        if self._rule_state is not None:
            sd["rule_state"] = [t.detach().clone() for t in pytree.tree_leaves(self._rule_state)]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        leaves = state_dict.pop("rule_state", None)
        super().load_state_dict(state_dict)
        self._rule_state = None
        if leaves is not None:
            params = {n: p.detach() for n, p in self.model.named_parameters()}
            spec = pytree.tree_flatten(self.rule.init(params))[1]
            self._rule_state = pytree.tree_unflatten([t.clone() for t in leaves], spec)
