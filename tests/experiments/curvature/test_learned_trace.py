"""Learned Fisher-trace estimator on MLPs: target, standard estimator, symmetry, task."""
import json

import pytest
import torch

import gradmeta as gm
from gradmeta.experiments.curvature.learned_trace import (LearnedTraceEstimator, evaluate_trace_estimator, make_trace_dataset,
                                train_trace_estimator)
from gradmeta.experiments.curvature.learned_trace import IN_FEATURES, NUM_CLASSES, _digits, normalised_abs_error
from gradmeta.models import classification_loss, mlp

H = 5


def _model(params):
    model = mlp([IN_FEATURES, H, H, NUM_CLASSES]).double()
    model.load_state_dict({k: v.double() for k, v in params.items()})
    return model


def _naive_sq_norm(model, x, y):
    """``‖∇_θ CE(model(x), y)‖²`` for one point, by plain autograd."""
    g = torch.autograd.grad(classification_loss(model(x[None]), y[None]).sum(), list(model.parameters()))
    return sum(t.square().sum() for t in g)


@pytest.fixture(scope="module")
def ds():
    return make_trace_dataset(2, hidden=H, set_size=6, num_points=15, train_steps=3, seed=4, dtype=torch.float64)


@pytest.fixture(scope="module")
def digits():
    return _digits(torch.float64)


def test_target_is_naive_true_fisher_trace(ds, digits):
    x_all = digits[0]
    for i in range(len(ds)):
        model, x = _model({k: v[i] for k, v in ds.params.items()}), x_all[ds.points[i]]
        want = 0.0
        for n in range(len(x)):  # labels summed out under the model's predictive distribution
            p = model(x[n:n + 1]).softmax(-1)[0].detach()
            want += sum(p[y] * _naive_sq_norm(model, x[n], torch.tensor(y)) for y in range(NUM_CLASSES))
        torch.testing.assert_close(ds.target[i], want / len(x), rtol=1e-10, atol=0)


def test_standard_estimator_is_naive_mean_squared_norm(ds, digits):
    x_all = digits[0]
    for i in range(len(ds)):
        model, x = _model({k: v[i] for k, v in ds.params.items()}), x_all[ds.points[i, :6]]
        want = sum(_naive_sq_norm(model, x[b], ds.labels[i, b]) for b in range(6)) / 6
        torch.testing.assert_close(ds.standard[i], want, rtol=1e-10, atol=0)
        assert ds.sets[i].batch_size == 6
    ev = evaluate_trace_estimator(None, ds)
    assert ev["ratio"] == 1.0
    want = ((ds.standard - ds.target).abs() / ds.target).mean()
    torch.testing.assert_close(torch.tensor(ev["standard_nmae"], dtype=torch.float64), want)


def test_rao_blackwell_reference_is_naive(ds, digits):
    from gradmeta.curvature import rao_blackwell_trace
    x_all = digits[0]
    for i in range(len(ds)):
        model, x = _model({k: v[i] for k, v in ds.params.items()}), x_all[ds.points[i, :6]]
        params, last = list(model.parameters()), list(model[4].parameters())
        want = 0.0
        for b in range(6):  # the sampled label in the other layers, summed out under p in the last
            p = model(x[b:b + 1]).softmax(-1)[0].detach()
            for y in range(NUM_CLASSES):
                g = torch.autograd.grad(classification_loss(model(x[b:b + 1]), torch.tensor([y])).sum(), params)
                sq_last = sum(t.square().sum() for t in g[-len(last):])
                want += p[y] * sq_last + (sum(t.square().sum() for t in g[:-len(last)]) if y == ds.labels[i, b] else 0)
        torch.testing.assert_close(rao_blackwell_trace(ds.sets[i]), want / 6, rtol=1e-10, atol=0)


def test_starts_at_the_standard_estimator(ds):
    for kind in ("gradmetanet", "gradmetanet-no-norms", "norms_deepsets", "flat_mlp", "averaged_grad"):
        est = LearnedTraceEstimator(kind, hidden=H, channels=4, layers=1).double()
        est.fit_normalisation(ds.sets)
        torch.testing.assert_close(est(ds.sets), ds.standard, rtol=0, atol=0)


def _permute_hidden(params, p1, p2):
    q = dict(params)
    q["0.weight"], q["0.bias"] = params["0.weight"][p1], params["0.bias"][p1]
    q["2.weight"], q["2.bias"] = params["2.weight"][p2][:, p1], params["2.bias"][p2]
    q["4.weight"] = params["4.weight"][:, p2]
    return q


@pytest.mark.parametrize("kind", ["gradmetanet", "gradmetanet++", "gradmetanet-no-norms", "norms_deepsets",
                                  "averaged_grad"])
def test_invariant_to_hidden_permutations_and_data_order(ds, digits, kind):
    torch.manual_seed(0)
    est = LearnedTraceEstimator(kind, hidden=H, channels=8, layers=1).double()
    est.fit_normalisation(ds.sets)
    with torch.no_grad():
        est.gamma.fill_(0.7)
    params = {k: v[0] for k, v in ds.params.items()}
    x, y = digits[0][ds.points[0, :6]], ds.labels[0]
    perms = (torch.tensor([3, 0, 4, 1, 2]), torch.tensor([1, 4, 0, 2, 3]))

    def predict(p, xs, ys):
        return est([gm.collect_gradients(_model(p), classification_loss, xs, ys)])[0]

    out = predict(params, x, y)
    torch.testing.assert_close(predict(_permute_hidden(params, *perms), x, y), out, rtol=1e-10, atol=0)
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    torch.testing.assert_close(predict(params, x[order], y[order]), out, rtol=1e-10, atol=0)
    assert (out - ds.standard[0]).abs() > 1e-6 * ds.standard[0]  # not the identity
    if kind.startswith("gradmetanet"):  # the inputs are not a symmetry: permuting pixels must change the output
        pix = torch.randperm(IN_FEATURES, generator=torch.Generator().manual_seed(0))
        q = dict(params, **{"0.weight": params["0.weight"][:, pix]})
        assert (predict(q, x[:, pix], y) - out).abs() > 1e-9 * out


def test_training_runs_and_task_tiny_spec(tmp_path):
    data = make_trace_dataset(4, hidden=H, set_size=8, num_points=16, train_steps=2, seed=1)
    torch.manual_seed(0)
    est = LearnedTraceEstimator("gradmetanet", hidden=H, channels=4, layers=1)
    hist = train_trace_estimator(est, data, steps=3, batch_size=2, lr=1e-2)
    assert len(hist["loss"]) == 1 and torch.isfinite(torch.tensor(hist["loss"])).all()
    assert est.gamma.item() != 0.0
    with pytest.raises(ValueError, match="h=6"):
        train_trace_estimator(LearnedTraceEstimator("flat_mlp", hidden=6), data, steps=1)
    with pytest.raises(ValueError, match="kind"):
        LearnedTraceEstimator("nope")
    with pytest.raises(ValueError, match="shape|vs target"):
        normalised_abs_error(torch.ones(2), torch.ones(3))

    from gradmeta.run import run_spec
    spec = tmp_path / "s.toml"
    spec.write_text('task = "curvature_learned_trace"\nseeds = [0]\nwidths = [4]\ntrain_size = 3\n'
                    'models = ["gradmetanet", "flat_mlp", "averaged_grad"]\n'
                    '[data]\nset_size = 6\nnum_points = 12\ntest_size = 3\ntrain_steps = 1\n'
                    '[model]\nchannels = 4\nlayers = 1\n[train]\nsteps = 2\nbatch_size = 2\n')
    out = run_spec(spec, tmp_path / "run", max_steps=1, progress=False)  # one job, then resume the rest
    done = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["results"]
    assert list(done) == ["gradmetanet/h4/seed0"]
    out = run_spec(spec, tmp_path / "run", resume=True, progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete"
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["gradmetanet/h4/seed0"] == done["gradmetanet/h4/seed0"]  # not recomputed on resume
    for kind in ("gradmetanet", "flat_mlp", "averaged_grad"):
        assert f"ratio/{kind}/h4" in m["summary"]
    assert (out / "curvature_learned_trace.png").exists() and "h=4" in (out / "table.md").read_text()
    assert "Rao–Blackwell" in (out / "table.md").read_text()
    assert json.loads((out / "results.json").read_text())["environment"]["torch_threads"] == 1
