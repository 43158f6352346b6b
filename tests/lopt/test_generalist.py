"""GeneralistRule: slow per-tensor reference (float64), Adam when untrained, no drift at zero
gradient whatever the meta-parameters, vmap = loop, LearnedOptimizer and state_dict round trip."""
import math

import pytest
import torch
from torch.func import vmap

from gradmeta.lopt import GeneralistRule, LearnedOptimizer, save_checkpoint
from gradmeta.models import mlp

DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)


def _random_meta(rule, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: (scale * torch.randn(v.shape, generator=g, dtype=torch.float64)) if k != "log_lr"
            else torch.tensor(math.log(1e-2), dtype=torch.float64) for k, v in rule.init_meta(0).items()}


def _reference_step(meta, p, m, v, g, t, total, log_step=None):
    """One step of one tensor, scalar by scalar formulas written out (t is 1-based).

    ``log_step``: per-entry log step sizes of the adaptive rule (already updated for this step)."""
    m = [b * mk + (1 - b) * g for b, mk in zip(DECAYS, m)]
    v = 0.999 * v + 0.001 * g * g
    r = 1 / (torch.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    feats = [m[DECAYS.index(b)] / (1 - b ** t) * r for b in (0.5, 0.9, 0.99)] + [g * r]
    feats = [f.clamp(-10, 10) for f in feats]
    prog = min(t / total, 1.0) if total else 0.0
    phi = torch.tensor([math.exp(-((prog - c) / 0.25) ** 2) for c in (0, 0.25, 0.5, 0.75, 1)], dtype=torch.float64)
    new = torch.empty_like(p)
    for i in range(p.numel()):
        x = torch.stack([f.reshape(-1)[i] for f in feats])
        h = torch.relu(x @ meta["w0"][:4] + phi @ meta["w0"][4:] + meta["b0"])
        h = torch.relu(h @ meta["w1"] + meta["b1"])
        a, b, c = torch.tanh(h @ meta["w2"] + meta["b2"])
        u = torch.exp(0.5 * a) * x[1] + 0.5 * b * x[0] + 0.5 * c * x[2]
        alpha = torch.exp(meta["log_lr"] + 2 * torch.tanh(meta["w_sched"] @ phi))
        if log_step is not None:
            u = u * torch.exp(log_step.reshape(-1)[i])
        new.reshape(-1)[i] = p.reshape(-1)[i] - alpha * u
    if log_step is not None:
        m[0] = log_step.clone()  # the adaptive rule keeps its log step size in the decay-0.1 slot
    return new, m, v


def _reference_log_steps(meta, ref, grads, t):
    """The adaptive log step sizes of every tensor after step ``t``, from the state before it (loops)."""
    d_prev, dot, ng, nd = {}, 0.0, 0.0, 0.0
    for k, (p, m, v, *_) in ref.items():
        d = torch.zeros_like(p)
        for i in range(p.numel()):
            if t > 1:
                r = 1 / (math.sqrt(v.reshape(-1)[i] / (1 - 0.999 ** (t - 1))) + 1e-8)
                d.reshape(-1)[i] = min(max(m[2].reshape(-1)[i] / (1 - 0.9 ** (t - 1)) * r, -10), 10)
            gi = grads[k].reshape(-1)[i]
            dot, ng, nd = dot + gi * d.reshape(-1)[i], ng + gi * gi, nd + d.reshape(-1)[i] ** 2
        d_prev[k] = d
    cos = dot / max(math.sqrt(ng) * math.sqrt(nd), 1e-30)
    vsum = sum(float(v.sum()) for _, _, v, *_ in ref.values()) / (1 - 0.999 ** max(t - 1, 1))
    shrink = min(max(0.25 * math.log(max(float(ng), 1e-30) / max(vsum, 1e-30)), -1), 1) if t > 1 else 0.0
    out = {}
    for k, (p, m, v, *_) in ref.items():
        s = m[0].clone()
        for i in range(p.numel()):
            r = 1 / (math.sqrt(v.reshape(-1)[i] / (1 - 0.999 ** max(t - 1, 1))) + 1e-8)
            gr = min(max(grads[k].reshape(-1)[i] * r, -10), 10)
            elem = min(max(gr * d_prev[k].reshape(-1)[i], -1), 1)
            z = meta["w_adapt"][0] * cos + meta["w_adapt"][1] * elem + meta["w_adapt"][2] * shrink
            s.reshape(-1)[i] = min(max(s.reshape(-1)[i] + 0.1 * math.tanh(z), -3), 3)
        out[k] = s
    return out


@pytest.mark.parametrize("total,adaptive", [(None, False), (5, False), (5, True), (None, True)])
def test_matches_slow_reference_float64(total, adaptive):
    rule = GeneralistRule(hidden=6, total_steps=total, adaptive=adaptive)
    meta = _random_meta(rule, scale=1.0)
    if adaptive:
        meta["w_adapt"] = torch.tensor([8.0, -3.0, 2.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
    state = rule.init(params)
    ref = {k: (v.clone(), [torch.zeros_like(v) for _ in DECAYS], torch.zeros_like(v)) for k, v in params.items()}
    for t in range(1, 8):
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 10 ** (t % 3 - 1) for k, v in params.items()}
        if t >= 4:  # a persistent direction, so that the alignment features are far from zero
            grads = {k: v.abs() + 0.5 for k, v in grads.items()}
        params, state = rule.update(meta, grads, state, params)
        steps = _reference_log_steps(meta, ref, grads, t) if adaptive else {k: None for k in ref}
        ref = {k: _reference_step(meta, *ref[k], grads[k], t, total, steps[k]) for k in ref}
        for k in params:
            torch.testing.assert_close(params[k], ref[k][0], rtol=1e-10, atol=1e-12)
            if adaptive:
                torch.testing.assert_close(state.momenta[k][0], ref[k][1][0], rtol=1e-10, atol=1e-12)
    if adaptive:
        assert max(float(s.abs().max()) for s in steps.values()) > 0.2  # the step size did adapt
    assert float(state.step) == 7 and float(state.skipped) == 0


@pytest.mark.parametrize("adaptive", [False, True])
def test_untrained_is_adam(adaptive):
    torch.manual_seed(0)
    model, ref = mlp([6, 5, 3]).double(), mlp([6, 5, 3]).double()
    ref.load_state_dict(model.state_dict())
    rule = GeneralistRule(lr=3e-3, adaptive=adaptive)
    path_meta = {k: v.double() for k, v in rule.init_meta(0).items()}
    path_meta["log_lr"] = torch.tensor(math.log(3e-3), dtype=torch.float64)  # not rounded through float32
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = rule.init(params)
    adam = torch.optim.Adam(ref.parameters(), lr=3e-3, eps=1e-8)
    for _ in range(20):
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
        adam.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        adam.step()
        loss = torch.func.functional_call(model, params, (x,))
        grads = torch.func.grad(lambda p: torch.nn.functional.cross_entropy(
            torch.func.functional_call(model, p, (x,)), y))(params)
        params, state = rule.update(path_meta, grads, state, params)
    for k, p in ref.named_parameters():
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kw", [{}, {"adaptive": True}, {"lr_free": True}])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_no_drift_at_zero_gradient_by_construction(tmp_path, scale, kw):
    """Random (and large) meta-parameters, 300 steps of zero gradients: parameters exactly still."""
    rule = GeneralistRule(hidden=8, **kw)
    meta = {k: v.float() for k, v in _random_meta(rule, seed=3, scale=scale).items()}
    path = save_checkpoint(tmp_path / "g.pt", rule, meta)
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    start = [p.detach().clone() for p in model.parameters()]
    opt = LearnedOptimizer(model.parameters(), checkpoint=path, total_steps=400)  # lr-free: not yet decayed at 301
    for _ in range(300):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, q in zip(model.parameters(), start):
        assert torch.equal(p.detach(), q)
    # the same rule does move once there is a gradient
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert any(not torch.equal(p.detach(), q) for p, q in zip(model.parameters(), start))


@pytest.mark.parametrize("kw", [{}, {"adaptive": True}, {"lr_free": True}])
def test_vmap_equals_loop(kw):
    rule = GeneralistRule(hidden=6, total_steps=10, **kw)
    meta = {k: v.float() for k, v in _random_meta(rule, seed=2).items()}
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, 2, generator=g), "b": torch.randn(4, 2, generator=g)}
    vp, vs = params, vmap(rule.init)(params)
    lps = [{k: v[i] for k, v in params.items()} for i in range(4)]
    lss = [rule.init(p) for p in lps]
    for _ in range(4):  # several steps, so that adaptive step sizes and distance estimates read their state
        grads = {k: torch.randn(v.shape, generator=g) + 0.5 for k, v in params.items()}
        vp, vs = vmap(lambda p, gr, s: rule.update(meta, gr, s, p))(vp, grads, vs)
        for i in range(4):
            lps[i], lss[i] = rule.update(meta, {k: v[i] for k, v in grads.items()}, lss[i], lps[i])
    for i in range(4):
        for k in lps[i]:
            torch.testing.assert_close(vp[k][i], lps[i][k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(vs.momenta[k][i], lss[i].momenta[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_optimizer_matches_rule_and_state_dict_round_trip(tmp_path, adaptive):
    rule = GeneralistRule(hidden=8, adaptive=adaptive)
    check_optimizer_matches_rule(tmp_path, rule, {k: v.double() for k, v in _random_meta(rule, seed=5).items()})


def check_optimizer_matches_rule(tmp_path, rule, meta):
    """12 float64 steps of ``LearnedOptimizer`` (from a checkpoint of ``rule, meta``) equal the rule's
    own updates, with a round trip at step 6 through a state dict into an optimizer built from
    another checkpoint ("digits") and a model copy. Returns the final optimizer."""
    path = save_checkpoint(tmp_path / "g.pt", rule, meta)
    torch.manual_seed(0)
    model = mlp([5, 7, 2]).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    rule.total_steps = 12
    state = rule.init(params)
    opt = LearnedOptimizer(model.parameters(), checkpoint=path, total_steps=12)
    data = [(torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 2, (8,))) for _ in range(12)]
    loss = lambda m, p, x, y: torch.nn.functional.cross_entropy(torch.func.functional_call(m, p, (x,)), y)  # noqa: E731
    for t, (x, y) in enumerate(data):
        if t == 6:  # round trip through a state dict into a fresh optimizer and model copy
            sd = opt.state_dict()
            model2 = mlp([5, 7, 2]).double()
            model2.load_state_dict(model.state_dict())
            model = model2
            opt = LearnedOptimizer(model.parameters(), checkpoint="digits", total_steps=12)
            opt.load_state_dict(sd)
        opt.zero_grad()
        loss(model, dict(model.named_parameters()), x, y).backward()
        opt.step()
        grads = torch.func.grad(lambda p: loss(model, p, x, y))(params)
        params, state = rule.update(meta, grads, state, params)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[k], rtol=1e-10, atol=1e-12)
    return opt


@pytest.mark.parametrize("adaptive", [False, True])
def test_non_finite_step_is_skipped(adaptive):
    rule = GeneralistRule(adaptive=adaptive)
    meta = rule.init_meta(0)
    params = {"w": torch.ones(3)}
    state = rule.init(params)
    new, state = rule.update(meta, {"w": torch.tensor([1.0, float("nan"), 0.0])}, state, params)
    assert torch.equal(new["w"], params["w"]) and float(state.skipped) == 1 and float(state.step) == 0


def test_bad_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        GeneralistRule(total_steps=0)


def test_shipped_generalist_does_not_move_at_zero_gradient():
    from gradmeta.lopt import NAMED_CHECKPOINTS, load_checkpoint

    lo, _ = load_checkpoint("generalist")
    assert isinstance(lo, GeneralistRule) and NAMED_CHECKPOINTS["generalist"].is_file()
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    start = [p.detach().clone() for p in model.parameters()]
    opt = LearnedOptimizer(model.parameters(), checkpoint="generalist", total_steps=300)
    for _ in range(300):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), start))


def test_adaptive_is_bounded_and_old_checkpoints_load(tmp_path):
    """The log step size stays within ±3 whatever ``w_adapt``; a checkpoint saved without the
    adaptive part (config without ``adaptive``) loads as the non-adaptive rule."""
    from gradmeta.lopt import load_checkpoint

    rule = GeneralistRule(hidden=4, adaptive=True)
    meta = rule.init_meta(0)
    meta["w_adapt"] = torch.tensor([1e4, 1e4, 0.0])
    params = {"w": torch.zeros(50)}
    state = rule.init(params)
    for _ in range(80):  # a constant gradient: every alignment is +1, the step size grows to its cap
        params, state = rule.update(meta, {"w": torch.ones(50)}, state, params)
    assert torch.allclose(state.momenta["w"][0], torch.full((50,), 3.0))
    plain = GeneralistRule(hidden=4)
    path = save_checkpoint(tmp_path / "old.pt", plain, plain.init_meta(0))
    lo, m = load_checkpoint(path)
    assert not lo.adaptive and "w_adapt" not in m and lo.config() == {"hidden": 4, "lr": 3e-3}
    path = save_checkpoint(tmp_path / "new.pt", rule, meta)
    lo, m = load_checkpoint(path)
    assert lo.adaptive and torch.equal(m["w_adapt"], meta["w_adapt"])
