"""torch.func path: full per-example gradients of any module, ``vmap(grad(functional_call))``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ._collect import as_tuple, batch_size_of, check_losses, check_no_batch_mixing


def per_example_grads(model: nn.Module, loss_fn: Callable, inputs, targets, *,
                      chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{param_name: (B, *param.shape)}`` of every trainable parameter.

    The reference path: works for any module without batch-mixing layers, at the cost of
    materialising ``B × parameters`` numbers. Dropout draws a different mask per example.

    Args:
        model: the model; its trainable parameters are differentiated.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-example losses.
        inputs: a batch-first tensor or a tuple of them.
        targets: a batch-first tensor (or pytree of them), split along dim 0 with the inputs.
        chunk_size: examples per vectorised chunk (``None`` = all at once); lowers peak memory.
    """
    check_no_batch_mixing(model)
    inputs = as_tuple(inputs)
    batch_size_of(inputs)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_one(p, x, y):
        xs = tuple(t.unsqueeze(0) for t in x)
        y1 = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), y)
        out = functional_call(model, (p, frozen, buffers), xs)
        return check_losses(loss_fn(out, y1), 1)[0]

    with torch.enable_grad():
        return vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different",
                    chunk_size=chunk_size)(params, inputs, targets)
