"""Per-call capture: which modules are factored, which parameters take the exact fallback, and
the forward hooks that record layer inputs for exactly one call.

Thread safety: nothing is stored on the model. Every call installs its own hooks, and a hook acts
only when the context variable ``_ACTIVE`` holds its own call's ``Session`` (each thread has its
own context), so forwards of other calls or threads on the same model pass through untouched.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ._errors import GradientCollectionError
from ._rules import FactorRule, rule_for

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("gradmeta_grads_session", default=None)


def call_model(model: nn.Module, inputs):
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def split_inputs(inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return (inputs if isinstance(inputs, tuple) else (inputs,)), {}


def seq_first(m: nn.Module) -> bool:
    """True for modules that read ``(T, B, ...)`` tensors (``batch_first=False``; torch's transformer
    layers keep the flag on their attention)."""
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not m.self_attn.batch_first
    if isinstance(m, nn.TransformerEncoder) and len(m.layers):
        return seq_first(m.layers[0])
    return getattr(m, "batch_first", True) is False


def root_batch_dim(model: nn.Module) -> int:
    return 1 if seq_first(model) else 0


def batch_size_of(inputs, batch_dim: int = 0) -> int:
    """Size of the batch axis of the first tensor (in argument / key order) in ``inputs``; ``B = 0``
    is an error."""
    leaves = [x for x in torch.utils._pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor) and x.dim() > batch_dim]
    if not leaves:
        raise GradientCollectionError("inputs contain no tensor with a batch dimension")
    B = leaves[0].shape[batch_dim]
    if B == 0:
        raise GradientCollectionError(f"the batch is empty (inputs of shape {tuple(leaves[0].shape)}): "
                                      "per-example gradients need at least one example")
    return B


def check_losses(losses, batch_size: int) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor) or losses.shape != (batch_size,):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise GradientCollectionError(
            f"loss_fn must return per-example losses of shape (B,) = ({batch_size},), got {got}. "
            "Use reduction='none' and reduce any token axis inside loss_fn "
            "(gm.grads.causal_lm_losses does so for language models).")
    if not losses.is_floating_point() or not (losses.requires_grad or _wrapped(losses)):
        raise GradientCollectionError(
            f"loss_fn returned {'a ' + str(losses.dtype) if not losses.is_floating_point() else 'detached'} "
            "losses: the loss must be a floating-point function of the model's parameters "
            "(no .detach(), .item(), argmax or integer casts inside loss_fn).")
    return losses


def _wrapped(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def check_no_batch_mixing(model: nn.Module) -> None:
    """Raise ``GradientCollectionError`` for modules whose output mixes the examples of a batch."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            raise GradientCollectionError(
                f"module '{name}' ({type(m).__name__}) normalises with batch statistics, so one "
                "example's output depends on the others and per-example gradients are undefined. "
                "Call model.eval() (with running statistics) or replace it by GroupNorm/LayerNorm.")


@dataclass
class Plan:
    """What one call collects: factored modules and the parameters of the exact fallback."""

    hooked: dict[str, nn.Module]
    rules: dict[str, FactorRule]
    batch_dims: dict[str, int]
    report: dict[str, dict[str, str]]                  # module -> {local name: parameter name}
    fallback: dict[str, nn.Parameter]                  # parameter name -> parameter
    requested: dict[str, nn.Module] | None             # modules given as layers=
    names: dict[int, str] = field(default_factory=dict)  # id(parameter) -> parameter name

    def move_to_fallback(self, pname: str, param: nn.Parameter) -> None:
        self.fallback[pname] = param
        for rep in self.report.values():
            for local in [k for k, v in rep.items() if v == pname]:
                del rep[local]


def make_plan(model: nn.Module, layers: Iterable[str] | None) -> Plan:
    named_modules = dict(model.named_modules())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in trainable.items()}
    requested = None
    if layers is None:
        selected = dict(trainable)
    else:
        missing = [n for n in layers if n not in named_modules]
        if missing:
            raise GradientCollectionError(f"layers {missing} are not modules of {type(model).__name__}")
        requested = {n: named_modules[n] for n in layers}
        selected = {names[id(p)]: p for m in requested.values() for p in m.parameters() if id(p) in names}
        if not selected:
            raise GradientCollectionError(f"layers {list(requested)} hold no trainable parameters")
    holders: dict[int, list[tuple[str, str]]] = {}
    for mname, m in named_modules.items():
        for local, p in m._parameters.items():
            if p is not None and id(p) in names:
                holders.setdefault(id(p), []).append((mname, local))
    plan = Plan({}, {}, {}, {}, {}, requested, names)
    seq = {n for n, m in named_modules.items() if seq_first(m)}
    for pname, p in selected.items():
        uses = holders.get(id(p), [])
        rules = []
        for mname, _ in uses:
            m = named_modules[mname]
            rule = rule_for(m)
            if rule is not None:
                rule.check(m, mname)
                if rule.covers(m) is not None:
                    rule = None
            rules.append(rule)
        if not uses or any(r is None for r in rules):
            plan.fallback[pname] = p
            continue
        for (mname, local), rule in zip(uses, rules):
            plan.hooked[mname], plan.rules[mname] = named_modules[mname], rule
            plan.report.setdefault(mname, {})[local] = pname
            plan.batch_dims[mname] = _batch_dim(mname, seq)
    # A module that uses a child's parameters functionally (attention and its out_proj) records the
    # child's calls itself: hook it whenever the child is factored.
    for mname in list(plan.hooked):
        parent, _, local = mname.rpartition(".")
        if mname and parent not in plan.hooked:
            rule = rule_for(named_modules[parent]) if parent in named_modules else None
            if rule is not None and local in rule.owned_children and rule.covers(named_modules[parent]) is None:
                plan.hooked[parent], plan.rules[parent] = named_modules[parent], rule
                plan.report.setdefault(parent, {})
                plan.batch_dims[parent] = _batch_dim(parent, seq)
    return plan


def _batch_dim(mname: str, seq: set) -> int:
    parts = mname.split(".") if mname else []
    return int(any(".".join(parts[:i]) in seq for i in range(len(parts) + 1)))


@dataclass
class Record:
    name: str
    stored: torch.Tensor
    output: torch.Tensor        # the (possibly batch-expanded / probed) output the model continues with
    batch_dim: int
    input_shape: tuple
    edge: object = None
    #: ``(offset, width)``: this call's output fills columns ``offset:offset+d_out`` of a
    #: ``width``-wide ``Δ`` (zeros elsewhere), e.g. the q / k / v parts of an attention in-projection.
    place: tuple[int, int] | None = None


class Session:
    """State of one call. ``mode``: ``"hooks"`` (gradient edges of outputs), ``"functional"``
    (adds ``probes[i]`` to the i-th recorded output, whose gradient is then ``Δ``)."""

    def __init__(self, plan: Plan, batch_size: int, mode: str = "hooks", probes=None):
        self.plan, self.B, self.mode, self.probes = plan, batch_size, mode, probes
        self.records: list[Record] = []

    def record(self, name: str, stored: torch.Tensor, output: torch.Tensor, batch_dim: int,
               input_shape: tuple, place: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Record one factored call of module ``name``; returns the tensor the model must continue
        with instead of ``output`` (``None``: ``output`` itself)."""
        rec = Record(name, stored, output, batch_dim, tuple(input_shape), place=place)
        new = None
        if self.mode == "functional":
            i = len(self.records)
            if i >= len(self.probes) or self.probes[i].shape != output.shape:
                raise GradientCollectionError(
                    f"module '{name}' was called differently than in the structure pass (call {i}, "
                    f"output {tuple(output.shape)}); the model's control flow must not depend on "
                    "parameter values")
            new = rec.output = output + self.probes[i]
        else:
            if not output.requires_grad:
                raise GradientCollectionError(
                    f"module '{name}' ({type(self.plan.hooked.get(name)).__name__}) produced an output that "
                    "does not require grad; is it run under torch.no_grad() inside the model?")
            rec.edge = get_gradient_edge(output)
        self.records.append(rec)
        return new

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """What a rule stores of a layer input: detached, except in functional mode."""
        return x if self.mode == "functional" else x.detach()

    def hook(self, name: str):
        module, rule, bd = self.plan.hooked[name], self.plan.rules[name], self.plan.batch_dims[name]

        def fn(mod, args, *rest):
            # ``rest`` is ``(kwargs, output)``, or ``(output,)`` when another thread's forward sees this
            # hook half-registered (torch records the with_kwargs flag in a second step).
            if _ACTIVE.get() is not self:
                return None     # another call's forward (other thread, or plain inference)
            kwargs, output = (rest[0], rest[1]) if len(rest) == 2 else ({}, rest[0])
            if rule.replaces_forward:
                return rule.forward_again(self, name, mod, args, kwargs)
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or x.dim() <= bd:
                raise GradientCollectionError(
                    f"module '{name}' ({type(mod).__name__}) was called with input "
                    f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__} and returned "
                    f"{type(output).__name__}; its rule needs a batched tensor input and a tensor output")
            expanded = None
            if x.shape[bd] == 1 and self.B > 1 and output.dim() > bd and output.shape[bd] == 1:
                # Called on one row that the model broadcasts over the batch (e.g. position ids (1, T)):
                # continue with the output expanded to B rows, whose gradients are per example.
                x = x.expand(x.shape[:bd] + (self.B,) + x.shape[bd + 1:])
                expanded = output = output.expand(output.shape[:bd] + (self.B,) + output.shape[bd + 1:])
            rule.verify(mod, x, output, name)
            stored = rule.capture(mod, self.keep(x).movedim(bd, 0))
            new = self.record(name, stored, output, bd, x.shape)
            return expanded if new is None else new
        return fn

    def check_batch(self, B: int) -> None:
        """Modules called on tensors without the batch on their batch axis (e.g. tokens flattened
        to ``(B·T, d)``, or a sequence-first call the configuration does not announce) cannot be
        factored: their parameters go to the exact fallback."""
        for r in self.records:
            if r.input_shape[r.batch_dim] != B:
                module = self.plan.hooked[r.name]
                for local, pname in list(self.plan.report.get(r.name, {}).items()):
                    self.plan.move_to_fallback(pname, module._parameters[local])


@contextlib.contextmanager
def capturing(session: Session):
    """Install the session's hooks and make it the active one in this context (thread)."""
    handles = [m.register_forward_hook(session.hook(n), with_kwargs=True) for n, m in session.plan.hooked.items()]
    token = _ACTIVE.set(session)
    try:
        yield session
    finally:
        _ACTIVE.reset(token)
        for h in handles:
            h.remove()


def route_outside_uses(session: Session, losses: torch.Tensor) -> set:
    """Walk the autograd graph of ``losses``: a factored parameter used more often than its hooked
    modules' reachable calls account for (a tied head used functionally, a weight read outside its
    module) goes to the exact fallback, so no use is dropped. Returns the reachable graph nodes."""
    counts: dict[int, int] = {}
    seen = set()
    stack = [losses.grad_fn] if losses.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            if hasattr(nxt, "variable"):
                counts[id(nxt.variable)] = counts.get(id(nxt.variable), 0) + 1
            elif nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    seen.update(fn for fn in [losses.grad_fn] if fn is not None)
    plan = session.plan
    reach: dict[str, int] = {}
    for r in session.records:
        if (r.edge.node if r.edge is not None else r.output.grad_fn) in seen:
            reach[r.name] = reach.get(r.name, 0) + 1
    expected: dict[str, int] = {}
    params: dict[str, nn.Parameter] = {}
    for mname, rep in plan.report.items():
        m = plan.hooked[mname]
        for local, pname in rep.items():
            expected[pname] = expected.get(pname, 0) + reach.get(mname, 0)
            params[pname] = m._parameters[local]
    for pname, p in params.items():
        used = counts.get(id(p), 0)
        if used > expected[pname] or used == 0:
            plan.move_to_fallback(pname, p)
    for n, m in (plan.requested or {}).items():
        if not any(counts.get(id(p), 0) for p in m.parameters() if p.requires_grad):
            raise GradientCollectionError(
                f"requested layer '{n}' ({type(m).__name__}) was never called in the forward pass and "
                "its parameters are not used by the loss: its per-example gradients would all be zero")
    return seen
