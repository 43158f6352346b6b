"""Shared references and fixtures: slow, obvious implementations that the library is checked against."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn


def naive_per_example_grads(model: nn.Module, loss_fn, inputs, targets) -> dict[str, torch.Tensor]:
    """Per-example gradients by a Python loop: one forward+backward per example."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for b in range(inputs[0].shape[0]):
        loss = loss_fn(model(*(x[b:b + 1] for x in inputs)), targets[b:b + 1])
        assert loss.shape == (1,)
        rows.append(torch.autograd.grad(loss[0], list(params.values()), allow_unused=True,
                                        materialize_grads=True))
    return {n: torch.stack([r[i] for r in rows]) for i, n in enumerate(params)}


def flatten_params(grads: dict[str, torch.Tensor], batch_dims: int = 1) -> torch.Tensor:
    """``{name: (B, *shape)} -> (B, P)`` in dict order."""
    return torch.cat([g.flatten(batch_dims) for g in grads.values()], dim=-1)


def assert_dicts_close(got: dict, want: dict, atol: float = 1e-10, rtol: float = 0.0):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def assert_reductions_match(gs, want: dict[str, torch.Tensor], atol: float = 1e-10):
    """A gradient set's per-example gradients, norms, Gram, Fisher diagonal and mean against
    per-example gradients ``want`` (``{name: (B, *shape)}``, e.g. from :func:`naive_per_example_grads`)."""
    assert_dicts_close(gs.per_example_grads(), want, atol=atol)
    flat = flatten_params(want)
    torch.testing.assert_close(gs.grad_norms(), flat.norm(dim=1), atol=atol, rtol=0)
    torch.testing.assert_close(gs.gram(), flat @ flat.T, atol=atol, rtol=0)
    assert_dicts_close(gs.fisher_diagonal(), {k: g.square().mean(0) for k, g in want.items()}, atol=atol)
    assert_dicts_close(gs.mean_grad(), {k: g.mean(0) for k, g in want.items()}, atol=atol)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_spec(folder: Path, text: str, name: str = "tiny.toml") -> Path:
    """Write a (dedented) spec file ``folder/name`` and return its path."""
    path = Path(folder) / name
    path.write_text(textwrap.dedent(text))
    return path
