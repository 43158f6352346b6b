"""Hooks path: factors of every supported layer from one forward and one backward pass, plus the
exact fallback for every other trainable parameter."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ._capture import (Plan, Session, batch_size_of, call_model, capturing, check_losses, check_no_batch_mixing,
                       make_plan, root_batch_dim, route_outside_uses)
from ._errors import GradientCollectionError
from ._factors import LayerFactors
from ._rules import DenseRule
from ._set import GradientSet


def collect_gradients(model: nn.Module, loss_fn: Callable, inputs, targets,
                      layers: Iterable[str] | None = None) -> GradientSet:
    """Factored per-example gradients of every trainable parameter, from one forward pass.

    Parameters of supported layers (``gradmeta.grads.supported_layers()``) are kept as factors
    ``(A, Δ)`` from one backward pass; every other trainable parameter (raw ``nn.Parameter``s,
    RNN weights, unknown modules, weights also used outside their module) takes the exact fallback:
    its per-example gradients from one batched backward (``GradientSet.fallback_params`` lists them).
    A parameter shared by several modules (weight tying) gets the sum of all its uses.

    Args:
        model: any module whose examples do not interact (no BatchNorm in train mode). Modules
            under a ``batch_first=False`` module (``nn.TransformerEncoderLayer``, ...) are read
            sequence-first.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-example losses; ``outputs`` is whatever the
            model returns (e.g. a Hugging Face output object).
        inputs: a tensor, a tuple of them (positional arguments) or a dict (keyword arguments); the
            batch size ``B`` is the first axis of the first tensor.
        targets: passed to ``loss_fn`` unchanged (any pytree).
        layers: module names whose parameters (recursively) to collect; ``None`` = all trainable
            parameters. Restricting never changes a number: all uses of a selected parameter count.

    Returns:
        A ``GradientSet``. Parameter ``.grad`` fields are left untouched; weight-gradient matmuls of
        factored layers are skipped.
    """
    if torch.is_inference_mode_enabled():
        raise GradientCollectionError("collect_gradients cannot run under torch.inference_mode()")
    check_no_batch_mixing(model)
    B = batch_size_of(inputs, root_batch_dim(model))
    plan = make_plan(model, layers)
    session = Session(plan, B)
    with torch.enable_grad():
        with capturing(session):
            outputs = call_model(model, inputs)
        losses = check_losses(loss_fn(outputs, targets), B)
        session.check_batch(B)
        reachable = route_outside_uses(session, losses)
        records = [r for r in session.records if r.name in plan.report and plan.report[r.name]
                   and r.edge.node in reachable]
        fallback = dict(plan.fallback)
        deltas = torch.autograd.grad(losses.sum(), [r.edge for r in records], retain_graph=bool(fallback),
                                     allow_unused=True) if records else ()
        dense = {}
        if fallback:
            eye = torch.eye(B, dtype=losses.dtype, device=losses.device)
            got = torch.autograd.grad(losses, list(fallback.values()), eye, is_grads_batched=True,
                                      allow_unused=True)
            dense = {n: torch.zeros((B,) + p.shape, dtype=p.dtype, device=p.device) if g is None else g
                     for (n, p), g in zip(fallback.items(), got)}
    return assemble(plan, records, deltas, dense, losses.detach())


def assemble(plan: Plan, records, deltas, dense: dict[str, torch.Tensor], losses,
             detach: bool = True) -> GradientSet:
    """One ``LayerFactors`` per factored module (its calls concatenated along the token axis: a
    gradient sums over calls) and one per fallback parameter."""
    per_module: dict[str, tuple[list, list]] = {}
    for r, d in zip(records, deltas):
        rule, m = plan.rules[r.name], plan.hooked[r.name]
        if d is None:
            d = torch.zeros_like(r.output)
        d = rule.backprop(m, d.movedim(r.batch_dim, 0))
        if r.place is not None:
            offset, width = r.place
            d = torch.nn.functional.pad(d, (offset, width - offset - d.shape[-1]))
        d = rule.finish(m, r.stored, d.detach() if detach else d)
        a_list, d_list = per_module.setdefault(r.name, ([], []))
        a_list.append(r.stored)
        d_list.append(d)
    out: dict[str, LayerFactors] = {}
    for name in [n for n in plan.hooked if n in per_module]:      # module registration order
        a_list, d_list = per_module[name]
        m = plan.hooked[name]
        own = dict(m.named_parameters(recurse=False))
        out[name] = LayerFactors(module_type=type(m).__name__, param_names=dict(plan.report[name]),
                                 param_shapes={k: p.shape for k, p in own.items()},
                                 backprops=_cat_tokens(d_list), _inputs=_cat_tokens(a_list), _rule=plan.rules[name])
    for pname, g in dense.items():
        local = pname.rsplit(".", 1)[-1]
        out[pname] = LayerFactors(module_type="fallback", param_names={local: pname},
                                  param_shapes={local: g.shape[1:]}, backprops=g.detach() if detach else g, _inputs=None,
                                  _rule=_DENSE)
    return GradientSet(out, losses)


_DENSE = DenseRule()


def _cat_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
