"""Functional capture: the factors of ``collect_gradients`` from a pure function of a parameter
dict and a batch, so meta-learning code can ``torch.func.vmap`` over many inner models."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ._capture import (Session, _wrapped, batch_size_of, capturing, check_losses, check_no_batch_mixing,
                       make_plan, root_batch_dim, route_outside_uses, split_inputs)
from ._collect import assemble
from ._errors import GradientCollectionError
from ._set import GradientSet


def _placeholder(t):
    """A plain tensor of ``t``'s logical shape (for the structure pass under a transform)."""
    if isinstance(t, torch.Tensor) and _wrapped(t):
        return torch.zeros(t.shape, dtype=t.dtype, device=t.device)
    return t


#: Entries a ``structure_cache`` holds at most (it is emptied when full).
_STRUCTURE_CACHE_SIZE = 32


def _signature(tree) -> tuple:
    """Hashable description of a batch: ``(shape, dtype, device)`` of every tensor leaf (the logical
    shape under a transform), the value of every other leaf."""
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    return (str(spec),) + tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x)
                                for x in leaves)


def functional_factors(model: nn.Module, loss_fn: Callable, params: Mapping[str, torch.Tensor], inputs, targets,
                       layers: Iterable[str] | None = None, structure_cache: dict | None = None) -> GradientSet:
    """``collect_gradients`` of ``model`` evaluated at ``params``, as a pure function of ``params``
    and the batch: usable under ``torch.func.vmap`` (over parameter sets and/or batches) and
    ``torch.func.grad``.

    Args:
        model: the architecture; its parameters not in ``params``, and its buffers, are used as they are.
        loss_fn, inputs, targets, layers: as for ``collect_gradients``.
        params: ``{name: tensor}`` keyed like ``model.named_parameters()``.
        structure_cache: a dict the caller keeps (initially empty) for repeated calls on a model it
            does not change between them (same modules, hooks, frozen parameters and loss function):
            the structure pass then runs once per input and target shapes, training mode, ``layers``
            and loss function object, and later calls reuse what it found (about 0.3 ms per call for
            a small MLP). It holds at most 32 entries.

    Returns:
        A ``GradientSet`` equal to ``collect_gradients`` on a model holding ``params``. Under ``vmap``
        return its tensors (e.g. ``.grad_norms()``, ``.per_example_grads()``), not the set itself.

    How: a structure pass (the model's own parameters, plain autograd; under a transform the inputs
    are replaced by zeros of the same shape) fixes which modules are factored, the output shapes of
    their calls and which parameters need the exact fallback; the factored pass adds a zero probe
    ``z_i`` to the i-th layer output and takes ``Δ_i = ∂(Σ_b ℓ_b)/∂z_i`` with ``torch.func.vjp`` (the
    fallback parameters' per-example gradients with a ``vmap`` of the same vjp over one-hot
    cotangents). The model's control flow must not depend on parameter values.
    """
    key = None
    if structure_cache is not None:
        key = (_signature(inputs), _signature(targets), model.training,
               None if layers is None else tuple(layers), loss_fn)
        if key in structure_cache:
            B, plan, shapes = structure_cache[key]
            return _factored_pass(model, loss_fn, params, inputs, targets, B, plan, shapes)
    check_no_batch_mixing(model)
    B = batch_size_of(inputs, root_batch_dim(model))
    plan = make_plan(model, layers)
    # Structure pass.
    structure = Session(plan, B)
    args, kwargs = split_inputs(torch.utils._pytree.tree_map(_placeholder, inputs))
    with torch._C._DisableFuncTorch(), torch.enable_grad():   # plain autograd even inside torch.func.grad
        with capturing(structure):
            out = model(*args, **kwargs)
        losses0 = check_losses(loss_fn(out, torch.utils._pytree.tree_map(_placeholder, targets)), B)
        structure.check_batch(B)
        route_outside_uses(structure, losses0)
    shapes = [(r.output.shape, r.output.dtype, r.output.device) for r in structure.records]
    del out, losses0, structure
    if structure_cache is not None:
        if len(structure_cache) >= _STRUCTURE_CACHE_SIZE:  # e.g. a new loss function object at every call
            structure_cache.clear()
        structure_cache[key] = (B, plan, shapes)
    return _factored_pass(model, loss_fn, params, inputs, targets, B, plan, shapes)


def _factored_pass(model: nn.Module, loss_fn: Callable, params: Mapping[str, torch.Tensor], inputs, targets,
                   B: int, plan, shapes: list) -> GradientSet:
    """The factored pass of :func:`functional_factors`, given what its structure pass found."""
    args, kwargs = split_inputs(inputs)
    fb_names = list(plan.fallback)
    given = dict(params)
    for n in fb_names:
        given.setdefault(n, plan.fallback[n].detach())
    probes = [torch.zeros(s, dtype=d, device=dev) for s, d, dev in shapes]

    sessions = []

    def run(zs, fb):
        session = Session(plan, B, mode="functional", probes=zs)
        sessions.append(session)
        with capturing(session):
            o = functional_call(model, {**given, **fb}, args, kwargs, strict=False)
        ls = check_losses(loss_fn(o, targets), B)
        return ls, [r.stored for r in session.records]

    # Nothing is detached: under torch.func.grad the factors stay differentiable in ``params``.
    losses, pullback, stored = vjp(run, probes, {n: given[n] for n in fb_names}, has_aux=True)
    records = sessions[-1].records
    if len(records) != len(probes):
        raise GradientCollectionError(
            f"the model made {len(records)} calls to factored modules, {len(probes)} in the structure pass; "
            "its control flow must not depend on parameter values")
    ones = torch.ones_like(losses)
    deltas, _ = pullback(ones)
    dense = {}
    if fb_names:
        eye = torch.eye(B, dtype=losses.dtype, device=losses.device)
        _, dense = vmap(pullback)(eye)
    keep = [i for i, r in enumerate(records) if plan.report.get(r.name)]
    for i, s in zip(range(len(records)), stored):
        records[i].stored = s
    return assemble(plan, [records[i] for i in keep], [deltas[i] for i in keep], dense, losses, detach=False)
