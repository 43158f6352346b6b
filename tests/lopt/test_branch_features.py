"""How the branch rules (GradMetaNetLO, WeightSpaceLO) hand their features to the per-parameter MLP:
the update equals the plain composition (readout per tensor, optional per-tensor centring, running
average, PerParamMLP.update with the features as per-tensor extras), in float64."""
import pytest
import torch
from torch.func import functional_call

from gradmeta.lopt import GradMetaNetLO, SupervisedTask, WeightSpaceLO, digits_mlp
from gradmeta.models import classification_loss, mlp


@pytest.fixture(scope="module")
def digits64():
    """Digits MLP 64-6-10 in float64, batch 12."""
    t = digits_mlp(hidden=[6], batch_size=12)
    return SupervisedTask(mlp([64, 6, 10]).double(), classification_loss, t.X.double(), t.y, t.X_test.double(),
                          t.y_test, batch_size=12, name="digits64")


def _trained_looking(lo):
    gen = torch.Generator().manual_seed(1)
    meta = {k: v.double() + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
            for k, v in lo.init_meta(0).items()}
    meta["mlp.w2"] = 0.3 * torch.randn(meta["mlp.w2"].shape, generator=gen, dtype=torch.float64)
    return meta


def _per_tensor(out, params, E, center):
    """``{name: (n, E)}``: each tensor's readout as rows of entries, its mean removed if ``center``."""
    rows = {k: out[k].reshape(-1, E) for k in params}
    return {k: r - r.mean(0) for k, r in rows.items()} if center else rows


def _reference_step(lo, meta, params, state, batch, task):
    """One step of ``lo`` composed by hand, tensor by tensor."""
    x, y = task.split(batch)
    grads, gs, _ = lo.gradients(lo.model if hasattr(lo, "model") else task.model, task.loss_fn, params, x, y)
    mlp_meta = {k[4:]: v for k, v in meta.items() if k.startswith("mlp.")}
    E = lo.E
    if isinstance(lo, GradMetaNetLO):
        out = functional_call(lo.net, {k[4:]: v for k, v in meta.items() if k.startswith("gmn.")}, (gs,))
        rows = _per_tensor(out, params, E, lo.center_branch)
        t = state.base.step + 1
        avg = {k: lo.avg_decay * state.avg[k].reshape(-1, E) + (1 - lo.avg_decay) * rows[k] for k in params}
        extra = {k: torch.cat([rows[k], avg[k] / (1 - lo.avg_decay ** t)], 1).reshape(*params[k].shape, 2 * E)
                 for k in params}
        new, base = lo.base.update(mlp_meta, grads, state.base, params, extra)
        return new, state._replace(base=base, avg={k: avg[k].reshape(*params[k].shape, E) for k in params})
    rms = lambda t: t / torch.sqrt(t.square().mean() + 1e-12)  # noqa: E731
    out = functional_call(lo.net, {k[3:]: v for k, v in meta.items() if k.startswith("ws.")},
                          ({k: rms(v) for k, v in grads.items()},), {"params": {k: rms(v) for k, v in params.items()}})
    rows = _per_tensor(out, params, E, lo.center_branch)
    return lo.base.update(mlp_meta, grads, state, params, {k: rows[k].reshape(*params[k].shape, E) for k in params})


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("E", [1, 2])
@pytest.mark.parametrize("kind", ["gradmetanet", "weightspace"])
def test_update_equals_the_tensor_by_tensor_composition(digits64, kind, E, center):
    if kind == "gradmetanet":
        lo = GradMetaNetLO(digits64, gmn_channels=E, hidden=8, layers=2, examples=5, center_branch=center)
    else:
        lo = WeightSpaceLO(digits64, out_channels=E, hidden=8, center_branch=center)
    meta = _trained_looking(lo)
    params = digits64.init(0)
    state = ref_state = lo.init(params)
    ref_params = params
    batches = digits64.batches(torch.Generator().manual_seed(0), 3)
    for t in range(3):
        batch = tuple(b[t] for b in batches)
        params, state, _ = lo.step(digits64, meta, params, state, batch)
        ref_params, ref_state = _reference_step(lo, meta, ref_params, ref_state, batch, digits64)
        for a, b in zip(torch.utils._pytree.tree_leaves((params, state)),
                        torch.utils._pytree.tree_leaves((ref_params, ref_state))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["gradmetanet", "weightspace"])
def test_centring_changes_the_step_and_is_checked(digits64, kind):
    make = (lambda **kw: GradMetaNetLO(digits64, gmn_channels=2, hidden=8, layers=2, examples=5, **kw)) \
        if kind == "gradmetanet" else (lambda **kw: WeightSpaceLO(digits64, out_channels=2, hidden=8, **kw))
    plain, centred = make(), make(center_branch=True)
    assert "center_branch" not in plain.config() and centred.config()["center_branch"] is True
    assert type(centred)(digits64, **centred.config()).center_branch
    meta = _trained_looking(plain)
    params, batch = digits64.init(0), tuple(b[0] for b in digits64.batches(torch.Generator().manual_seed(0), 1))
    a = plain.step(digits64, meta, params, plain.init(params), batch)[0]
    b = centred.step(digits64, meta, params, centred.init(params), batch)[0]
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="center_branch must be True or False"):
        make(center_branch="yes")


def test_a_spec_sets_center_branch():
    from gradmeta.experiments.lopt.tasks import _make_lo

    task = digits_mlp(hidden=[8], batch_size=16)
    cfg = {"kind": "gradmetanet", "hidden": 8, "lr": 0.1, "step_mult": 0.03, "max_update": 0.1, "gmn_channels": 2,
           "weight_aware": False, "gmn_width": 8, "gmn_layers": 1, "gmn_heads": 1, "examples": 4,
           "neuron_ids": "relative", "extra_gate": True, "center_branch": True}
    assert _make_lo(task, cfg).center_branch and _make_lo(task, {**cfg, "kind": "weightspace"}).center_branch
    old = {k: v for k, v in cfg.items() if k != "center_branch"}  # a run folder written before the key
    assert not _make_lo(task, old).center_branch
