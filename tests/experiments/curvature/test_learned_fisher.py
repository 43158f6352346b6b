"""Learned Fisher-diagonal estimator: data, standard estimator, symmetry, training, task."""
import math

import pytest
import torch

import gradmeta as gm
from gradmeta.experiments.curvature.learned_fisher import (LearnedFisherEstimator, make_fisher_dataset, relative_error,
                                train_fisher_estimator)
from gradmeta.experiments.curvature.learned_fisher import output_loss
from gradmeta.inr import Siren


def _naive_grads(params, x):
    """``(P, n_params)`` output gradients, one autograd call per point (float64)."""
    model = Siren.from_params(params)
    rows = []
    for p in range(x.shape[0]):
        g = torch.autograd.grad(model(x[p:p + 1]).sum(), list(model.parameters()))
        rows.append(torch.cat([t.flatten() for t in g]))
    return torch.stack(rows), [n for n, _ in model.named_parameters()], [q.shape for q in model.parameters()]


def _unflat(v, names, shapes):
    out, k = {}, 0
    for n, s in zip(names, shapes):
        m = int(torch.Size(s).numel())
        out[n], k = v[k:k + m].reshape(s), k + m
    return out


@pytest.fixture(scope="module")
def ds():
    return make_fisher_dataset(2, set_size=8, num_points=40, hidden=5, seed=3, dtype=torch.float64)


def test_targets_equal_naive_fisher(ds):
    for i in range(len(ds)):
        params = {k: v[i] for k, v in ds.params.items()}
        g, names, shapes = _naive_grads(params, ds.inputs[i])
        want = _unflat(g.square().mean(0), names, shapes)
        for k in names:
            torch.testing.assert_close(ds.target[k][i], want[k], rtol=1e-10, atol=1e-14)


def test_standard_estimator_is_mean_of_squared_output_gradients(ds):
    for i in range(len(ds)):
        params = {k: v[i] for k, v in ds.params.items()}
        g, names, shapes = _naive_grads(params, ds.inputs[i][:8])
        want = _unflat(g.square().mean(0), names, shapes)
        for k in names:
            torch.testing.assert_close(ds.standard[k][i], want[k], rtol=1e-10, atol=1e-14)
        assert ds.sets[i].batch_size == 8
    # the standard estimator has zero error on itself, and relative_error is ≥ 0
    assert relative_error(ds.standard, ds.standard).abs().max() == 0
    assert (relative_error(ds.standard, ds.target) >= 0).all()


def test_quadrature_reference_weights(ds):
    from gradmeta.experiments.curvature.learned_fisher import quadrature_fisher
    params = {k: v[0] for k, v in ds.params.items()}
    x = ((torch.arange(8, dtype=torch.float64) + 0.5) / 8 * 2 - 1)[torch.randperm(8)].unsqueeze(-1)
    gs = gm.collect_gradients(Siren.from_params(params), output_loss, x, x.new_zeros(8))
    q, std = quadrature_fisher(gs), gs.fisher_diagonal()  # equally spaced cell centres: equal weights
    for k in std:
        torch.testing.assert_close(q[k], std[k], rtol=1e-12, atol=1e-15)
    x2 = x.clone()
    x2[0] = 0.99  # uneven points: weights = half-distances to neighbours (ends at ±1), naive sum
    gs2 = gm.collect_gradients(Siren.from_params(params), output_loss, x2, x2.new_zeros(8))
    xs = x2[:, 0].sort().values
    edges = torch.cat([xs.new_tensor([-1.0]), (xs[1:] + xs[:-1]) / 2, xs.new_tensor([1.0])])
    w = {float(xs[i]): float(edges[i + 1] - edges[i]) / 2 for i in range(8)}
    pe = gs2.per_example_grads()
    for k, g in pe.items():
        want = sum(w[float(x2[b, 0])] * g[b].square() for b in range(8))
        torch.testing.assert_close(quadrature_fisher(gs2)[k], want, rtol=1e-12, atol=1e-15)


def _permuted(params, perms):
    p1, p2 = perms
    q = dict(params)
    q["layers.0.weight"], q["layers.0.bias"] = params["layers.0.weight"][p1], params["layers.0.bias"][p1]
    q["layers.1.weight"] = params["layers.1.weight"][p2][:, p1]
    q["layers.1.bias"] = params["layers.1.bias"][p2]
    q["layers.2.weight"] = params["layers.2.weight"][:, p2]
    return q


@pytest.mark.parametrize("kind,cells", [("gradmetanet", False), ("gradmetanet++", False), ("gradmetanet++", True),
                                        ("averaged_grad", False)])
def test_equivariant_to_hidden_neuron_permutations(ds, kind, cells):
    torch.manual_seed(0)
    est = LearnedFisherEstimator(kind, hidden=5, channels=8, layers=1, cells=cells).double()
    est.fit_normalisation(ds.standard)
    with torch.no_grad():
        est.gamma.fill_(0.7)
    params = {k: v[0] for k, v in ds.params.items()}
    perms = (torch.tensor([3, 0, 4, 1, 2]), torch.tensor([1, 4, 0, 2, 3]))
    x = ds.inputs[0][:8]
    outs = []
    for p in (params, _permuted(params, perms)):
        gs = gm.collect_gradients(Siren.from_params(p), output_loss, x, x.new_zeros(8))
        std = {k: v[None] for k, v in gs.fisher_diagonal().items()}
        outs.append({k: v[0] for k, v in est([gs], std).items()})
    want = _permuted(outs[0], perms)
    for k in want:
        torch.testing.assert_close(outs[1][k], want[k], rtol=1e-10, atol=1e-12)
    assert any((outs[0][k] - std[k][0]).abs().max() > 1e-6 for k in std)  # not the identity
    xp = x[torch.randperm(8)]  # and invariant to the order of the data
    gs = gm.collect_gradients(Siren.from_params(params), output_loss, xp, xp.new_zeros(8))
    out = est([gs], {k: v[None] for k, v in gs.fisher_diagonal().items()})
    for k in out:
        torch.testing.assert_close(out[k][0], outs[0][k], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_tiny_training_reduces_loss():
    data = make_fisher_dataset(16, set_size=16, num_points=64, hidden=32, seed=1)
    torch.manual_seed(0)
    est = LearnedFisherEstimator("gradmetanet", channels=8, layers=1)
    est.fit_normalisation(data.standard)
    with torch.no_grad():
        before = relative_error(est(data.sets, data.standard), data.target).mean().item()
    train_fisher_estimator(est, data, steps=40, batch_size=16, lr=1e-2)
    with torch.no_grad():
        after = relative_error(est(data.sets, data.standard), data.target).mean().item()
    assert after < 0.9 * before, (before, after)


def _old_fit_minibatches(model, data, batch_loss, *, steps, batch_size, lr, seed=0, log_every=0):
    """The loop the learned curvature estimators used before ``gradmeta._training`` (reference)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    gen = torch.Generator().manual_seed(seed)
    hist = {"step": [], "loss": []}
    n = len(data)
    for step in range(1, steps + 1):
        idx = torch.randperm(n, generator=gen)[:min(batch_size, n)]
        loss = batch_loss(data.subset(idx)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (log_every and step % log_every == 0) or step == steps:
            hist["step"].append(step)
            hist["loss"].append(loss.item())
    return hist


def test_training_loop_is_bitwise_the_old_loop():
    kind = "averaged_grad"  # the loop does not depend on the model; this one is the fastest
    data = make_fisher_dataset(5, set_size=6, num_points=12, hidden=4, seed=2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(LearnedFisherEstimator(kind, hidden=4, channels=4, layers=1))
    new, old = models
    got = train_fisher_estimator(new, data, steps=5, batch_size=3, lr=3e-2, seed=4, log_every=2)
    old.fit_normalisation(data.standard)
    want = _old_fit_minibatches(old, data, lambda b: relative_error(old(b.sets, b.standard), b.target),
                                steps=5, batch_size=3, lr=3e-2, seed=4, log_every=2)
    assert got == want and got["step"] == [2, 4, 5]
    assert all(torch.equal(p, q) for p, q in zip(new.parameters(), old.parameters()))


def test_task_runs_tiny_spec(tmp_path):
    from gradmeta.run import run_spec

    spec = tmp_path / "s.toml"
    spec.write_text('task = "curvature_learned"\nseeds = [0]\ntrain_sizes = [4]\nplusplus_steps = 2\n'
                    '[data]\nset_size = 8\nnum_points = 16\nhidden = 4\ntest_size = 4\n'
                    '[model]\nchannels = 4\nlayers = 1\n[train]\nsteps = 3\nbatch_size = 2\n')
    out = run_spec(spec, tmp_path / "run", progress=False)
    import json
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete"
    for kind in ("gradmetanet", "gradmetanet++", "flat_mlp", "averaged_grad"):
        assert f"reduction/{kind}/n4" in m["summary"]
    assert math.isfinite(m["summary"]["reduction/quadrature"])
    assert (out / "curvature_learned.png").exists() and "N=4" in (out / "table.md").read_text()


def test_shipped_spec_resolves():
    from pathlib import Path

    from gradmeta.run import load_spec, resolve_spec

    path = Path(__file__).resolve().parents[3] / "tasks" / "curvature_learned_fisher.toml"
    spec = resolve_spec(load_spec(path), path)
    assert spec["task"] == "curvature_learned" and spec["data"]["set_size"] == 128
    assert spec["data"]["num_points"] == 1024 and spec["data"]["hidden"] == 32
