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


def _reference_step(meta, p, m, v, g, t, total):
    """One step of one tensor, scalar by scalar formulas written out (t is 1-based)."""
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
        new.reshape(-1)[i] = p.reshape(-1)[i] - alpha * u
    return new, m, v


@pytest.mark.parametrize("total", [None, 5])
def test_matches_slow_reference_float64(total):
    rule = GeneralistRule(hidden=6, total_steps=total)
    meta = _random_meta(rule)
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
    state = rule.init(params)
    ref = {k: (v.clone(), [torch.zeros_like(v) for _ in DECAYS], torch.zeros_like(v)) for k, v in params.items()}
    for t in range(1, 8):
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 10 ** (t % 3 - 1) for k, v in params.items()}
        params, state = rule.update(meta, grads, state, params)
        ref = {k: _reference_step(meta, *ref[k], grads[k], t, total) for k in ref}
        for k in params:
            torch.testing.assert_close(params[k], ref[k][0], rtol=1e-10, atol=1e-12)
    assert float(state.step) == 7 and float(state.skipped) == 0


def test_untrained_is_adam():
    torch.manual_seed(0)
    model, ref = mlp([6, 5, 3]).double(), mlp([6, 5, 3]).double()
    ref.load_state_dict(model.state_dict())
    rule = GeneralistRule(lr=3e-3)
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


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_no_drift_at_zero_gradient_by_construction(tmp_path, scale):
    """Random (and large) meta-parameters, 300 steps of zero gradients: parameters exactly still."""
    rule = GeneralistRule(hidden=8)
    meta = {k: v.float() for k, v in _random_meta(rule, seed=3, scale=scale).items()}
    path = save_checkpoint(tmp_path / "g.pt", rule, meta)
    torch.manual_seed(0)
    model = mlp([64, 32, 10])
    start = [p.detach().clone() for p in model.parameters()]
    opt = LearnedOptimizer(model.parameters(), checkpoint=path, total_steps=300)
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


def test_vmap_equals_loop():
    rule = GeneralistRule(hidden=6, total_steps=10)
    meta = {k: v.float() for k, v in _random_meta(rule, seed=2).items()}
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, 2, generator=g), "b": torch.randn(4, 2, generator=g)}
    state = vmap(rule.init)(params)
    grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    vp, vs = vmap(lambda p, gr, s: rule.update(meta, gr, s, p))(params, grads, state)
    for i in range(4):
        one = {k: v[i] for k, v in params.items()}
        lp, ls = rule.update(meta, {k: v[i] for k, v in grads.items()}, rule.init(one), one)
        for k in lp:
            torch.testing.assert_close(vp[k][i], lp[k], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(vs.momenta[k][i], ls.momenta[k])


def test_optimizer_matches_rule_and_state_dict_round_trip(tmp_path):
    rule = GeneralistRule(hidden=8)
    meta = {k: v.double() for k, v in _random_meta(rule, seed=5).items()}
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


def test_non_finite_step_is_skipped():
    rule = GeneralistRule()
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
