"""GradientStatsLO: its two statistics against a per-example loop, under vmap, and equivariance."""
import pytest
import torch
from torch.func import vmap
from torch.utils import _pytree as pytree

from gradmeta.lopt import GradientStatsLO, SupervisedTask, digits_mlp
from gradmeta.models import classification_loss, mlp


@pytest.fixture(scope="module")
def digits64():
    """Digits MLP 64-6-10 in float64, batch 12."""
    t = digits_mlp(hidden=[6], batch_size=12)
    return SupervisedTask(mlp([64, 6, 10]).double(), classification_loss, t.X.double(), t.y, t.X_test.double(),
                          t.y_test, batch_size=12, name="digits64")


def _per_example_loop(task, params, x, y):
    """``{name: (n, *shape)}``: each example's gradient by its own backward pass."""
    out = {k: [] for k in params}
    for i in range(len(y)):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss = classification_loss(torch.func.functional_call(task.model, p, (x[i:i + 1],)), y[i:i + 1]).sum()
        for k, g in zip(p, torch.autograd.grad(loss, list(p.values()))):
            out[k].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("examples,center", [(None, False), (5, False), (5, True)])
def test_statistics_equal_a_per_example_loop(digits64, examples, center):
    lo = GradientStatsLO(digits64, hidden=8, examples=examples, center_branch=center)
    params = digits64.init(0)
    x, y = digits64.split(tuple(b[0] for b in digits64.batches(torch.Generator().manual_seed(0), 1)))
    grads, gs, _ = lo.gradients(lo.model, digits64.loss_fn, params, x, y)
    n = examples or len(y)
    per = _per_example_loop(digits64, params, x[:n], y[:n])
    rows = []
    for k in params:
        rms = per[k].square().mean(0).sqrt()
        agree = torch.where(rms > 0, per[k].mean(0) / rms, torch.zeros_like(rms))
        block = torch.stack([rms.flatten(), agree.flatten()])
        rows.append(block - block.mean(-1, keepdim=True) if center else block)
    ref = torch.cat(rows, 1)
    zeros = int((torch.cat([per[k].square().sum(0).flatten() for k in params]) == 0).sum())
    assert 0 < zeros < ref.shape[1]  # digits have blank pixels: both cases are checked
    got = lo.branch_features(lo.init_meta(0), grads, params, gs)
    assert got.shape == (2, sum(v.numel() for v in params.values()))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    if not center:
        assert float(got[1].abs().max()) <= 1 + 1e-12  # |mean| <= RMS


def test_an_entry_with_no_gradient_gets_zero_agreement(digits64):
    lo = GradientStatsLO(digits64, hidden=8)
    params = digits64.init(0)
    params["0.weight"] = params["0.weight"].clone()
    params["0.weight"][2] = 0.0  # hidden unit 2 reads nothing...
    params["0.bias"] = params["0.bias"].clone()
    params["0.bias"][2] = -1.0  # ... and stays off under the ReLU: its input weights get no gradient
    x, y = digits64.split(tuple(b[0] for b in digits64.batches(torch.Generator().manual_seed(0), 1)))
    grads, gs, _ = lo.gradients(lo.model, digits64.loss_fn, params, x, y)
    feats = lo._branch({}, grads, params, gs)["0.weight"]
    assert torch.equal(feats[2], torch.zeros_like(feats[2])) and torch.isfinite(feats).all()


def test_vmapped_steps_equal_the_loop_and_are_equivariant(digits64):
    lo = GradientStatsLO(digits64, hidden=8, examples=7, extra_gate=True, center_branch=True)
    gen = torch.Generator().manual_seed(1)
    meta = {k: v.double() for k, v in lo.init_meta(0).items()}
    meta["mlp.w2"] = 0.3 * torch.randn(meta["mlp.w2"].shape, generator=gen, dtype=torch.float64)
    meta["mlp.extra_gate"] = torch.randn(meta["mlp.extra_gate"].shape, generator=gen, dtype=torch.float64)
    params = digits64.init_stacked([0, 1, 2])
    state = vmap(lo.init)(params)
    batches = digits64.batches(torch.Generator().manual_seed(0), 3)
    batch = tuple(b[:3] for b in batches)
    p_v, s_v, loss_v = vmap(lambda p, s, b: lo.step(digits64, meta, p, s, b))(params, state, batch)
    for i in range(3):
        one = pytree.tree_map(lambda a: a[i], (params, state, batch))
        p_i, s_i, loss_i = lo.step(digits64, meta, *one)
        torch.testing.assert_close(loss_v[i], loss_i, rtol=1e-12, atol=1e-12)
        for a, b in zip(pytree.tree_leaves((p_v, s_v)), pytree.tree_leaves((p_i, s_i))):
            torch.testing.assert_close(a[i], b, rtol=1e-10, atol=1e-12)
    # the gates read the statistics: the step differs from the gates-closed one
    closed = lo.step(digits64, {**meta, "mlp.extra_gate": torch.zeros_like(meta["mlp.extra_gate"])},
                     *pytree.tree_map(lambda a: a[0], (params, state, batch)))[0]
    assert any(not torch.allclose(closed[k], p_v[k][0]) for k in closed)
    # permuting the real network's hidden neurons permutes the step
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))

    def permute(p):
        return {"0.weight": p["0.weight"][perm], "0.bias": p["0.bias"][perm], "2.weight": p["2.weight"][:, perm],
                "2.bias": p["2.bias"]}

    one = pytree.tree_map(lambda a: a[0], (params, batch))
    a, _, _ = lo.step(digits64, meta, one[0], lo.init(one[0]), one[1])
    b, _, _ = lo.step(digits64, meta, permute(one[0]), lo.init(permute(one[0])), one[1])
    for k in a:
        torch.testing.assert_close(b[k], permute(a)[k], rtol=1e-10, atol=1e-12)


def test_a_spec_meta_trains_the_statistics_rule(tmp_path):
    from gradmeta.run import run_spec

    spec = tmp_path / "s.toml"
    spec.write_text('task = "lopt_meta_train"\n[inner]\nname = "digits"\nbatch_size = 16\nhidden = [8]\n'
                    '[optimizer]\nkind = "gradient_stats"\nhidden = 8\nexamples = 4\nextra_gate = true\n'
                    '[outer]\niterations = 2\nparticles = 2\ntruncation = 2\nhorizon = 4\n'
                    '[eval]\nevery = 2\nsteps = 4\nseeds = [5]\n')
    out = run_spec(spec, tmp_path / "run", progress=False)
    import json

    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete"
    from gradmeta.experiments.lopt.tasks import _from_run

    lo, meta = _from_run(str(out), digits_mlp(hidden=[8], batch_size=16))
    assert isinstance(lo, GradientStatsLO) and lo.examples == 4
    assert set(meta) == {f"mlp.{k}" for k in lo.base.init_meta(0)}  # no branch meta-parameters
