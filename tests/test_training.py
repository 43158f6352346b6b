"""``gradmeta._training.minibatch_train``: same draws and same ops as a hand-written loop, bit for bit.

The loops each experiment used before adopting the helper are kept as references in the tests of
those experiments (``tests/experiments/{curvature,nn,lora}``); here the helper's own contract.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradmeta._training import minibatch_train


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(11, 3, generator=g), torch.randn(11, 2, generator=g)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    return net, X, Y


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_uniform_constant_matches_plain_adam_loop():
    """Uniform sampling, no schedule, no clipping, every step logged: a plain Adam loop."""
    net, X, Y = _problem()
    ref, _, _ = _problem()
    opt, g, want = torch.optim.Adam(ref.parameters(), lr=1e-2), torch.Generator().manual_seed(3), []
    for _ in range(7):
        idx = torch.randint(11, (min(4, 11),), generator=g)
        loss = (ref(X[idx]) - Y[idx]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        want.append(loss.item())
    hist = minibatch_train(net, lambda i: (net(X[i]) - Y[i]).square().mean(), 11, steps=7, batch_size=4,
                           lr=1e-2, seed=3, sampling="uniform", log_every=1)
    assert hist == {"step": list(range(1, 8)), "loss": want}
    assert _same(net, ref)


def test_permutation_cosine_clip_logging_and_vector_losses():
    """Permutation batches (no repeats, capped at n), cosine lr, clipping, (G,) losses averaged."""
    net, X, Y = _problem(1)
    seen, lrs = [], []

    def loss(i):
        seen.append(i.tolist())
        return (net(X[i]) - Y[i]).square().mean(1)          # (G,)

    def log(step, value):
        lrs.append((step, value))

    hist = minibatch_train(net, loss, 11, steps=6, batch_size=20, lr=1e-2, seed=0, schedule="cosine", clip=0.5,
                           log_every=4, on_log=log)
    assert hist["step"] == [4, 6] and lrs == list(zip(hist["step"], hist["loss"]))
    assert all(sorted(s) == list(range(11)) for s in seen)  # batch_size capped at n, no repeats


def test_warmup_cosine_factor_and_average():
    net, X, Y = _problem(2)
    p = next(net.parameters())
    lrs = []
    hist = minibatch_train([p], lambda i: (net(X[i]) - Y[i]).square().mean(), 11, steps=8, batch_size=3, lr=0.1,
                           schedule="cosine", warmup=3, log_every=4, average=True,
                           on_log=lambda s, v: lrs.append(s))
    assert hist["step"] == [4, 8] and len(hist["loss"]) == 2 and lrs == [4, 8]
    # the factor: warm-up ramp times cosine, exactly 1 at s = 0 without warm-up
    from gradmeta._training import _lr_factor
    f = _lr_factor("cosine", 3, 8)
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert _lr_factor("cosine", 0, 8)(0) == 1.0 and _lr_factor("constant", 0, 8)(5) == 1.0


def test_epochs_visit_every_example_once_per_epoch():
    net, X, Y = _problem(3)
    seen = []

    def loss(i):
        seen.append(i.tolist())
        return (net(X[i]) - Y[i]).square().mean()

    hist = minibatch_train(net, loss, 11, epochs=3, batch_size=4, lr=1e-2, optimizer="adamw", weight_decay=0.1,
                           schedule="cosine")
    assert hist["epoch"] == [0, 1, 2] and len(hist["loss"]) == 3
    assert [len(s) for s in seen] == [4, 4, 3] * 3
    for e in range(3):
        assert sorted(sum(seen[3 * e:3 * e + 3], [])) == list(range(11))


@pytest.mark.parametrize("kw, msg", [
    (dict(steps=2, epochs=2), "exactly one of"),
    (dict(), "exactly one of"),
    (dict(steps=2, sampling="random"), "sampling"),
    (dict(steps=2, schedule="linear"), "schedule"),
    (dict(steps=2, optimizer="sgd"), "optimizer"),
    (dict(steps=2, clip=-1.0), "clip"),
    (dict(epochs=2, warmup=3), "warmup"),
])
def test_bad_arguments_are_named(kw, msg):
    net, X, Y = _problem()
    with pytest.raises(ValueError, match=msg):
        minibatch_train(net, lambda i: net(X[i]).sum(), 11, batch_size=2, lr=1e-2, **kw)


def test_imports_nothing_from_gradmeta():
    """A private core module: any package may use it without breaking the layering."""
    import ast
    from pathlib import Path

    import gradmeta._training as mod
    tree = ast.parse(Path(mod.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
    assert not [m for m in names if m.startswith("gradmeta")]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
