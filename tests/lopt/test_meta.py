"""meta_train / evaluate from Python on a user task; resume is bitwise; bad tasks are refused."""
import functools

import pytest
import torch

from gradmeta.lopt import (ES, PES, PerParamMLP, TruncatedBackprop, adam, evaluate, load_task, meta_train)
from tests.lopt.user_tasks import make_wine_task


@pytest.fixture(scope="module")
def wine():
    return make_wine_task()


def test_meta_train_resumes_to_the_uninterrupted_result(wine, tmp_path):
    lo = PerParamMLP(hidden=4)
    outer = functools.partial(PES, particles=2, truncation=2, horizon=4, objective="valid")
    full = meta_train(wine, lo, outer, iterations=4, progress=False, seed=1)
    lines = []
    part = meta_train(wine, lo, outer, iterations=2, out=tmp_path, checkpoint_every=1, seed=1,
                      progress=lambda it, info: lines.append((it, info["meta_loss"])))
    assert [i for i, _ in lines] == [1, 2] and (tmp_path / "meta_checkpoint.pt").is_file()
    assert any(not torch.equal(part[k], full[k]) for k in full)
    resumed = meta_train(wine, lo, outer, iterations=4, out=tmp_path, seed=1, progress=False)
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    blob = torch.load(tmp_path / "meta_checkpoint.pt", weights_only=True)
    assert blob["iteration"] == 4


@pytest.mark.parametrize("make", [functools.partial(ES, particles=2, horizon=3),
                                  functools.partial(TruncatedBackprop, particles=1, truncation=2, horizon=4,
                                                    backend="higher")])
def test_meta_train_with_every_outer_trainer(wine, make):
    lo = PerParamMLP(hidden=4)
    meta = meta_train(wine, lo, make(wine, lo), iterations=1, progress=False)
    assert set(meta) == set(lo.init_meta(0)) and all(torch.isfinite(v).all() for v in meta.values())


def test_evaluate_against_tuned_adam(wine):
    lo = PerParamMLP(hidden=4)
    out = evaluate(wine, lo, lo.init_meta(0), seeds=[1, 2], steps=6, eval_every=3, adam_lrs=[0.001, 0.01])
    assert out["adam_lr"] in (0.001, 0.01) and out["test_loss"].shape == (2, 3)
    assert out["step_reduction"].shape == out["best_test_loss"].shape == out["final_test_loss"].shape == (2,)
    assert torch.equal(out["final_test_loss"], out["test_loss"][:, -1])
    assert (out["best_test_loss"] <= out["final_test_loss"]).all()
    same = evaluate(wine, adam(out["adam_lr"]), seeds=[1, 2], steps=6, eval_every=3, adam_lrs=[out["adam_lr"]])
    assert torch.equal(same["step_reduction"], torch.ones(2, dtype=torch.float64))  # Adam against itself
    with pytest.raises(ValueError, match="meta="):
        evaluate(wine, lo, seeds=[1], steps=2, eval_every=1)


def test_bad_factories_and_arguments_are_refused(wine):
    with pytest.raises(ValueError, match="package.module:function"):
        load_task("tests.lopt.user_tasks")
    with pytest.raises(ValueError, match="cannot import"):
        load_task("tests.lopt.user_tasks:nope")
    with pytest.raises(TypeError, match="without init, batches, loss, test_loss"):
        load_task("tests.lopt.user_tasks:not_a_task")
    assert load_task("tests.lopt.user_tasks:make_wine_task").name == "wine_mlp"
    lo = PerParamMLP(hidden=4)
    with pytest.raises(ValueError, match="iterations"):
        meta_train(wine, lo, functools.partial(ES, particles=2, horizon=2), iterations=0)
    with pytest.raises(ValueError, match="another learned optimizer"):
        meta_train(wine, lo, ES(wine, PerParamMLP(hidden=4), particles=2, horizon=2), iterations=1)


def test_lr_scales_step_the_named_meta_parameters_at_their_own_rate(wine):
    from gradmeta.lopt import MetaTraining

    lo = PerParamMLP(hidden=4)

    def one_step(lr_scales):
        mt = MetaTraining(lo, PES(wine, lo, particles=2, truncation=2, horizon=4), meta_lr=0.01, seed=1,
                          lr_scales=lr_scales)
        before = {k: v.clone() for k, v in mt.detached().items()}  # detached() shares storage
        mt.step()
        return {k: (mt.meta[k].detach() - before[k]).abs() for k in before}, mt

    plain, mt_plain = one_step(None)
    scaled, _ = one_step({"w0": 0.1, "b": 0.5})
    # Adam's first step moves every entry with a non-zero gradient by its learning rate
    for k, f in (("w0", 0.1), ("b0", 0.5), ("b1", 0.5), ("w1", 1.0), ("log_lr", 1.0)):
        moved = plain[k] > 0
        assert moved.any(), k
        torch.testing.assert_close(scaled[k][moved], torch.full_like(scaled[k][moved], 0.01 * f), rtol=1e-3, atol=0)
    # all factors 1: one group, the optimizer state of a run without lr_scales
    same, mt_same = one_step({"w0": 1.0})
    assert len(mt_same.opt.param_groups) == 1 and all(torch.equal(same[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="names no meta-parameter"):
        one_step({"gmn.": 0.1})
    with pytest.raises(ValueError, match="positive number"):
        one_step({"w0": 0.0})


def test_meta_train_a_branch_on_top_of_a_meta_trained_rule_from_python(wine):
    # what a user writes: the per-parameter rule's meta-parameters as the branch rule's "mlp." part,
    # the estimator holding them fixed; the gates start closed, so the branch rule starts as that rule
    from gradmeta.lopt import GradMetaNetLO, MetaTraining

    base = meta_train(wine, PerParamMLP(hidden=4), functools.partial(PES, particles=2, truncation=2, horizon=4),
                      iterations=2, progress=False)
    lo = GradMetaNetLO(wine, hidden=4, layers=1, gmn_channels=2, examples=4, extra_gate=True)
    fixed = [f"mlp.{k}" for k in base]
    meta = meta_train(wine, lo, functools.partial(PES, particles=2, truncation=2, horizon=4, fixed=fixed),
                      iterations=2, progress=False, init={f"mlp.{k}": v for k, v in base.items()})
    for k, v in base.items():
        assert torch.equal(meta[f"mlp.{k}"], v), k
    assert meta["mlp.extra_gate"].abs().max() > 0
    with pytest.raises(ValueError, match=r"init has meta-parameters that GradMetaNetLO does not have with that "
                                         r"shape: w0 \(23, 4\)"):
        MetaTraining(lo, PES(wine, lo, particles=2, truncation=2, horizon=4), init={"w0": base["w0"]})
