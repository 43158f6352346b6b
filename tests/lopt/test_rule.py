"""The LearnedRule / GradientEstimator interfaces: every optimizer and trainer goes through them."""
import pytest
import torch

from gradmeta.lopt import (ES, PES, GradientEstimator, GradMetaNetLO, LearnedRule, PerParamMLP, TruncatedBackprop,
                           WeightSpaceLO, digits_mlp, es_grad, learned_curves)


def test_every_learned_optimizer_is_a_rule_and_every_trainer_an_estimator(small_digits):
    rules = [PerParamMLP(hidden=4), GradMetaNetLO(small_digits, gmn_channels=2, hidden=4),
             WeightSpaceLO(small_digits, out_channels=2, hidden=4)]
    assert all(isinstance(r, LearnedRule) for r in rules)
    for cls in (PES, ES, TruncatedBackprop):
        assert issubclass(cls, GradientEstimator)
    for rule in rules:  # one evaluation path for every rule, no flags
        c = learned_curves(small_digits, rule, rule.init_meta(0), [1, 2], steps=2, eval_every=1)
        assert c["test_loss"].shape == (1, 2, 3) and torch.isfinite(c["test_loss"]).all()
        assert c["skipped"].tolist() == [[0, 0]]


def test_gradmetanet_rule_leaves_the_task_model_alone_and_needs_the_gradient_set(small_digits):
    lo = GradMetaNetLO(small_digits, gmn_channels=2, hidden=4)
    params = small_digits.init(5)
    before = {k: v.clone() for k, v in small_digits.model.state_dict().items()}
    batch = tuple(b[0] for b in small_digits.batches(torch.Generator().manual_seed(0), 1))
    lo.step(small_digits, lo.init_meta(0), params, lo.init(params), batch)
    after = small_digits.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="needs the batch's gradient_set"):
        lo.update(lo.init_meta(0), params, lo.init(params), params)


def test_es_class_is_es_grad():
    task = digits_mlp(hidden=[4], batch_size=8)
    lo = PerParamMLP(hidden=4)
    meta = lo.init_meta(0)
    g1, info1 = es_grad(task, lo, meta, torch.Generator().manual_seed(0), particles=2, horizon=3)
    es = ES(task, lo, particles=2, horizon=3)
    gen = torch.Generator().manual_seed(0)
    g2, state, info2 = es.grad(meta, es.init(meta, gen), gen)
    assert all(torch.equal(g1[k], g2[k]) for k in meta) and info1 == info2
    assert int(state["step"]) == 0  # every ES estimate starts from fresh runs


def test_truncated_backprop_on_the_validation_objective_agrees_between_backends():
    task = digits_mlp(hidden=[4], batch_size=8, valid_fraction=0.2)
    lo = PerParamMLP(hidden=4)
    meta = lo.init_meta(0)
    meta["w2"] = 0.05 * torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    out = {}
    for objective in ("train", "valid", "valid_min"):
        for backend in ("func", "higher"):
            tb = TruncatedBackprop(task, lo, particles=1, truncation=2, horizon=4, backend=backend, objective=objective)
            gen = torch.Generator().manual_seed(0)
            out[objective, backend] = tb.grad(meta, tb.init(meta, gen), gen)
    for objective in ("train", "valid", "valid_min"):
        g_f, g_h = out[objective, "func"][0], out[objective, "higher"][0]
        for k in meta:
            torch.testing.assert_close(g_h[k], g_f[k], rtol=1e-4, atol=1e-7)
    assert out["train", "func"][2]["meta_loss"] != out["valid", "func"][2]["meta_loss"]
    assert out["valid_min", "func"][2]["meta_loss"] < out["valid", "func"][2]["meta_loss"]


def test_es_valid_min_objective_is_the_best_validation_loss_of_each_run():
    """``objective="valid_min"``: the meta-loss is the mean over particles of the lowest validation
    loss of each run (replayed here with the same draws), and an unknown objective is refused."""
    from gradmeta.lopt import ES, unroll

    task = digits_mlp(hidden=[4], batch_size=8, valid_fraction=0.2)
    lo = PerParamMLP(hidden=4)
    meta = lo.init_meta(0)
    infos = {}
    for objective in ("valid", "valid_min"):
        es = ES(task, lo, particles=2, horizon=6, sigma=0.0, objective=objective)
        gen = torch.Generator().manual_seed(0)
        infos[objective] = es.grad(meta, es.init(meta, gen), gen)[2]["meta_loss"]
    # replay: the same initial particles and batches (σ = 0: both particles use ``meta``)
    gen = torch.Generator().manual_seed(0)
    state = es.init(meta, gen)
    for v in meta.values():
        torch.randn(1, *v.shape, generator=gen, dtype=v.dtype)
    batches = es._batches(gen)
    best = []
    for i in range(2):
        params = {k: v[i] for k, v in state["params"].items()}
        opt_state = torch.utils._pytree.tree_map(lambda x: x[i], state["opt_state"])
        _, _, losses = unroll(task, lo, meta, params, opt_state, tuple(b[:, i] for b in batches), "valid")
        best.append(float(losses.min()))
    assert infos["valid_min"] == pytest.approx(sum(best) / 2, rel=1e-5)
    assert infos["valid_min"] < infos["valid"]
    with pytest.raises(ValueError, match="valid_min"):
        ES(task, lo, particles=2, horizon=6, objective="best")
