"""torch.func path: full per-example gradients of any module, ``vmap(grad(functional_call))``."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ._capture import batch_size_of, check_losses, check_no_batch_mixing, root_batch_dim, split_inputs
from ._errors import GradientCollectionError


def per_example_grads(model: nn.Module, loss_fn: Callable, inputs, targets, *,
                      chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per-example gradients ``{param_name: (B, *param.shape)}`` of every trainable parameter.

    The reference path: works for any module without batch-mixing layers whose forward runs under
    ``torch.func.vmap`` (no data-dependent Python control flow), at the cost of materialising
    ``B × parameters`` numbers. Dropout draws a different mask per example.

    Args:
        model: the model; its trainable parameters are differentiated.
        loss_fn: ``loss_fn(outputs, targets) -> (B,)`` per-example losses.
        inputs: a batch-first tensor, a tuple of them, or a dict (keyword arguments).
        targets: a batch-first tensor (or pytree of them), split along dim 0 with the inputs.
        chunk_size: examples per vectorised chunk (``None`` = all at once); lowers peak memory.
    """
    check_no_batch_mixing(model)
    batch_size_of(inputs, root_batch_dim(model))
    args, kwargs = split_inputs(inputs)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    unsq = lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t  # noqa: E731

    def loss_one(p, a, kw, y):
        tm = torch.utils._pytree.tree_map
        out = functional_call(model, (p, frozen, buffers), tm(unsq, a), tm(unsq, kw))
        return check_losses(loss_fn(out, tm(unsq, y)), 1)[0]

    try:
        with torch.enable_grad():
            return vmap(grad(loss_one), in_dims=(None, 0, 0, 0), randomness="different",
                        chunk_size=chunk_size)(params, args, kwargs, targets)
    except RuntimeError as e:
        if "vmap" in str(e) and ("data-dependent" in str(e) or ".item()" in str(e)):
            raise GradientCollectionError(
                f"{type(model).__name__} uses data-dependent control flow (e.g. an attention-mask "
                "check), which torch.func.vmap cannot run: use gm.collect_gradients (same numbers; its "
                "exact fallback needs no vmap over the forward), or for Hugging Face models "
                f"attn_implementation='eager'. torch said: {str(e).splitlines()[0]}") from e
        raise
