"""Hooks path: factors of every supported layer from one forward and one backward pass."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ._errors import GradientCollectionError
from ._factors import LayerFactors
from ._rules import rule_for
from ._set import GradientSet


def check_no_batch_mixing(model: nn.Module) -> None:
    """Raise ``GradientCollectionError`` for modules whose output mixes the examples of a batch."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            raise GradientCollectionError(
                f"module '{name}' ({type(m).__name__}) normalises with batch statistics, so one "
                "example's output depends on the others and per-example gradients are undefined. "
                "Call model.eval() (with running statistics) or replace it by GroupNorm/LayerNorm.")


def as_tuple(inputs) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def batch_size_of(inputs: tuple) -> int:
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return x.shape[0]
    raise GradientCollectionError("inputs contain no tensor with a batch dimension")


def check_losses(losses, batch_size: int) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor) or losses.shape != (batch_size,):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise GradientCollectionError(
            f"loss_fn must return per-example losses of shape (B,) = ({batch_size},), got {got}. "
            "Use reduction='none' and reduce any token axis inside loss_fn.")
    return losses


def _select_modules(model: nn.Module, layers: Iterable[str] | None) -> dict[str, nn.Module]:
    """Modules with trainable parameters to collect; unsupported ones are an error."""
    named = dict(model.named_modules())
    if layers is not None:
        layers = list(layers)
        missing = [n for n in layers if n not in named]
        if missing:
            raise GradientCollectionError(f"layers {missing} are not modules of {type(model).__name__}")
        candidates = {n: named[n] for n in layers}
    else:
        candidates = {n: m for n, m in named.items()
                      if any(p.requires_grad for p in m.parameters(recurse=False))}
    owner: dict[int, str] = {}
    for name, m in candidates.items():
        rule = rule_for(m)
        if rule is None:
            own = [k for k, p in m.named_parameters(recurse=False) if p.requires_grad]
            raise GradientCollectionError(
                f"module '{name}' ({type(m).__name__}) has trainable parameters {own} that the hooks "
                "path cannot factor. Use gm.per_example_grads(...) (torch.func path, any module), or "
                "pass layers=[...] naming only supported modules.")
        rule.check(m, name)
        for p in m.parameters(recurse=False):
            if id(p) in owner:
                raise GradientCollectionError(
                    f"modules '{owner[id(p)]}' and '{name}' share a parameter (weight tying); factored "
                    "gradients are per module. Use gm.per_example_grads(...) for tied models.")
            owner[id(p)] = name
    return candidates


def collect_gradients(model: nn.Module, loss_fn: Callable, inputs, targets,
                      layers: Iterable[str] | None = None) -> GradientSet:
    """Factored per-example gradients of every supported layer, from one forward+backward.

    Args:
        model: any module whose examples do not interact (no BatchNorm in train mode).
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-example losses.
        inputs: a batch-first tensor, or a tuple of them (passed as positional arguments).
        targets: passed to ``loss_fn`` unchanged.
        layers: module names to collect; ``None`` = every module with trainable parameters
            (all of which must be supported, see ``gradmeta.grads.supported_layers``).

    Returns:
        A ``GradientSet``. Parameter ``.grad`` fields are left untouched; weight-gradient matmuls
        are skipped (only gradients at layer outputs are computed).
    """
    if torch.is_inference_mode_enabled():
        raise GradientCollectionError("collect_gradients cannot run under torch.inference_mode()")
    check_no_batch_mixing(model)
    inputs = as_tuple(inputs)
    B = batch_size_of(inputs)
    modules = _select_modules(model, layers)
    calls: dict[str, list] = {n: [] for n in modules}

    def make_hook(name):
        rule = rule_for(modules[name])

        def hook(module, args, output):
            x = args[0]
            if x.dim() == 0 or x.shape[0] != B or not isinstance(output, torch.Tensor):
                raise GradientCollectionError(
                    f"module '{name}' ({type(module).__name__}) got input of shape {tuple(x.shape)}; "
                    f"expected batch-first inputs with batch size {B}")
            if not output.requires_grad:
                raise GradientCollectionError(
                    f"module '{name}' ({type(module).__name__}) produced an output that does not "
                    "require grad; are its parameters frozen or is it under torch.no_grad()?")
            calls[name].append((rule.capture(module, x.detach()), get_gradient_edge(output),
                                output.shape))
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.enable_grad():
            losses = check_losses(loss_fn(model(*inputs), targets), B)
            edges = [(n, i) for n in modules for i in range(len(calls[n]))]
            grads = torch.autograd.grad(losses.sum(), [calls[n][i][1] for n, i in edges],
                                        allow_unused=True, materialize_grads=True) if edges else ()
    finally:
        for h in handles:
            h.remove()
    return GradientSet(_assemble(model, modules, calls, dict(zip(edges, grads))), losses.detach())


def _assemble(model, modules, calls, grads) -> dict[str, LayerFactors]:
    """Concatenate the calls of each module along the token axis (a gradient sums over calls)."""
    param_name = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, LayerFactors] = {}
    for name, m in modules.items():
        rule = rule_for(m)
        stored, deltas = [], []
        for i, (x, _, shape) in enumerate(calls[name]):
            stored.append(x)
            deltas.append(rule.finish(m, x, rule.backprop(m, grads[(name, i)].reshape(shape)).detach()))
        if not stored:
            continue  # never called in this forward: its per-example gradients are zero
        own = dict(m.named_parameters(recurse=False))
        out[name] = LayerFactors(
            module_type=type(m).__name__,
            param_names={k: param_name[id(p)] for k, p in own.items() if p.requires_grad},
            param_shapes={k: p.shape for k, p in own.items()},
            backprops=_cat_tokens(deltas),
            _inputs=_cat_tokens(stored),
            _rule=rule,
        )
    return out


def _cat_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
