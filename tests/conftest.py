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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_spec(folder: Path, text: str, name: str = "tiny.toml") -> Path:
    """Write a (dedented) spec file ``folder/name`` and return its path."""
    path = Path(folder) / name
    path.write_text(textwrap.dedent(text))
    return path
