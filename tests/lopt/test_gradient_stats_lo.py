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


def test_pretraining_fits_the_branch_to_the_statistics_and_changes_nothing_else(small_digits):
    from gradmeta.lopt import GradMetaNetLO, PerParamMLP, pretrain_branch

    lo = GradMetaNetLO(small_digits, gmn_channels=3, hidden=8, examples=8, layers=2, extra_gate=True,
                       center_branch=True, product="bilinear")
    meta = lo.init_meta(0)
    fitted, info = pretrain_branch(lo, small_digits, meta, iterations=150, run_steps=40, every=5, seeds=(0, 1))
    assert info["sets"] == [8, 8] and info["loss_last"] < 0.5 * info["loss_first"]
    assert all(after > before + 0.2 for before, after in zip(info["r2_heldout_before"], info["r2_heldout"]))
    assert all(fitted[k] is meta[k] for k in meta if not k.startswith("gmn."))  # MLP and gates untouched
    assert any(not torch.equal(fitted[k], meta[k]) for k in meta if k.startswith("gmn."))
    # gates still closed: the pretrained rule still steps as the per-parameter rule of its seed
    ref = PerParamMLP(hidden=8)
    params = small_digits.init(3)
    batch = tuple(b[0] for b in small_digits.batches(torch.Generator().manual_seed(0), 1))
    a = lo.step(small_digits, fitted, params, lo.init(params), batch)[0]
    g = torch.func.grad(lambda q: small_digits.loss(q, batch).mean())(params)
    b = ref.update(ref.init_meta(0), g, ref.init(params), params)[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_pretraining_refuses_what_it_cannot_fit(small_digits):
    from gradmeta.lopt import GradMetaNetLO, pretrain_branch

    stats = GradientStatsLO(small_digits, hidden=8)
    with pytest.raises(ValueError, match="fits a GradMetaNetLO's branch, got a GradientStatsLO"):
        pretrain_branch(stats, small_digits, stats.init_meta(0))
    one = GradMetaNetLO(small_digits, gmn_channels=1, hidden=8)
    with pytest.raises(ValueError, match="gmn_channels=1"):
        pretrain_branch(one, small_digits, one.init_meta(0))
    two = GradMetaNetLO(small_digits, gmn_channels=2, hidden=8)
    with pytest.raises(ValueError, match="at least two inner-run seeds"):
        pretrain_branch(two, small_digits, two.init_meta(0), seeds=(0,))


def test_a_spec_pretrains_the_branch_once_and_resumes_bitwise(tmp_path):
    import json

    from gradmeta.run import run_spec
    from gradmeta.specs import SpecError

    spec = tmp_path / "s.toml"
    spec.write_text('task = "lopt_meta_train"\ncheckpoint_every = 1\n[inner]\nname = "digits"\nbatch_size = 16\n'
                    'hidden = [8]\n[optimizer]\nkind = "gradmetanet"\nhidden = 8\nexamples = 4\ngmn_layers = 1\n'
                    'extra_gate = true\ngmn_product = "bilinear"\npretrain_branch = 20\n'
                    '[outer]\niterations = 3\nparticles = 2\ntruncation = 2\nhorizon = 4\n'
                    '[eval]\nevery = 3\nsteps = 4\nseeds = [5]\n')
    whole = run_spec(spec, tmp_path / "whole", progress=False)
    m = json.loads((whole / "metrics.json").read_text())
    assert m["status"] == "complete" and m["summary"]["pretrain"]["sets"] == [80, 40]
    part = run_spec(spec, tmp_path / "part", progress=False, max_steps=1)
    part = run_spec(spec, part, progress=False, resume=True)
    a, b = (torch.load(f / "checkpoint.pt", weights_only=True)["state"]["meta"] for f in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = tmp_path / "bad.toml"
    bad.write_text(spec.read_text().replace('kind = "gradmetanet"', 'kind = "weightspace"')
                   .replace('gmn_product = "bilinear"\n', ''))
    with pytest.raises(SpecError, match="pretrain_branch"):
        run_spec(bad, tmp_path / "bad", progress=False)
