"""GeneralistRule(lr_free=True): the distance-based step size (Prodigy) against a slow float64
reference, invariance to the scale of the loss, and LearnedOptimizer (eight state rows) with its
state_dict round trip (no drift at zero gradient and vmap = loop: in test_generalist.py)."""
import math

import pytest
import torch

from gradmeta.lopt import GeneralistRule, load_checkpoint
from gradmeta.models import mlp

from .test_generalist import DECAYS, _random_meta, _reference_step, check_optimizer_matches_rule


def _reference_distance(x0, d, r, s, params, grads, gamma):
    """One Prodigy update of ``(d, r, s)`` over the concatenated entries, scalar by scalar."""
    beta = math.sqrt(0.999)
    lam = gamma * d * d
    flat_p = [float(x) for k in params for x in params[k].reshape(-1)]
    flat_g = [float(x) for k in params for x in grads[k].reshape(-1)]
    r = beta * r + (1 - beta) * lam * sum(g * (a - p) for g, a, p in zip(flat_g, x0, flat_p))
    s = [beta * si + (1 - beta) * lam * g for si, g in zip(s, flat_g)]
    return max(d, r / max(sum(abs(si) for si in s), 1e-30)), r, s


@pytest.mark.parametrize("total,random_meta", [(9, False), (9, True), (None, True)])
def test_matches_slow_reference_float64(total, random_meta):
    rule = GeneralistRule(hidden=6, total_steps=total, lr_free=True)
    meta = _random_meta(rule, scale=1.0) if random_meta else {k: v.double() for k, v in rule.init_meta(0).items()}
    meta["log_lr"] = torch.tensor(0.3, dtype=torch.float64)
    meta["log_d0"] = torch.tensor(math.log(1e-3), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
    state = rule.init(params)
    assert all(m.shape[0] == 8 for m in state.momenta.values())
    ref = {k: (v.clone(), [torch.zeros_like(v) for _ in DECAYS], torch.zeros_like(v)) for k, v in params.items()}
    x0 = [float(x) for k in params for x in params[k].reshape(-1)]
    d, r, s = 1e-3, 0.0, [0.0] * len(x0)
    ds = []
    for t in range(1, 10):
        # a quadratic pull towards 3 plus noise: consistent enough for the distance estimate to grow
        grads = {k: 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64) + (v - 3) for k, v in params.items()}
        prog = min(t / total, 1.0) if total else 0.0
        phi = torch.tensor([math.exp(-((prog - c) / 0.25) ** 2) for c in (0, 0.25, 0.5, 0.75, 1)], dtype=torch.float64)
        tail = min(1.0, (1 - prog) / 0.3)
        gamma = math.exp(2 * math.tanh(float(meta["w_sched"] @ phi))) * tail
        # the step: the learned update of the plain rule, its learning rate scaled by tail · d (old d)
        step_meta = dict(meta, log_lr=meta["log_lr"] + torch.log(torch.tensor(tail * d, dtype=torch.float64)))
        d, r, s = _reference_distance(x0, d, r, s, {k: ref[k][0] for k in ref}, grads, gamma)
        ds.append(d)
        ref = {k: _reference_step(step_meta, *ref[k], grads[k], t, total) for k in ref}
        params, state = rule.update(meta, grads, state, params)
        for k in params:
            torch.testing.assert_close(params[k], ref[k][0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(state.momenta[k][4], torch.full_like(params[k], d), rtol=1e-10, atol=0)
    if not random_meta:  # untrained: the estimate grows (random schedules may keep the steps too short)
        assert ds[-1] > 3 * 1e-3, ds
    if total:  # the last step of the run is fully decayed: the parameters no longer move
        before = {k: v.clone() for k, v in params.items()}
        params, state = rule.update(meta, grads, state, params)
        assert all(torch.equal(params[k], before[k]) for k in params)


def test_invariant_to_the_scale_of_the_loss():
    """Adam's direction and the ratio r / ‖s‖₁ are both unchanged when the loss is multiplied by 1000."""
    torch.manual_seed(0)
    model = mlp([6, 8, 3]).double()
    p0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    rule = GeneralistRule(lr_free=True, total_steps=40)
    meta = {k: v.double() for k, v in rule.init_meta(0).items()}
    data = [(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(40)]
    finals = []
    for scale in (1.0, 1000.0):
        params, state = dict(p0), rule.init(p0)
        for x, y in data:
            grads = torch.func.grad(lambda p: scale * torch.nn.functional.cross_entropy(
                torch.func.functional_call(model, p, (x,)), y))(params)
            params, state = rule.update(meta, grads, state, params)
        finals.append((params, float(state.momenta["0.weight"][4].flatten()[0])))
    assert finals[0][1] > 1e-3  # d grew from 1e-4
    assert finals[0][1] == pytest.approx(finals[1][1], rel=1e-6)
    for k in p0:
        torch.testing.assert_close(finals[0][0][k], finals[1][0][k], rtol=1e-5, atol=1e-6)  # Adam ε aside
        assert float((finals[0][0][k] - p0[k]).abs().max()) > 1e-2


def test_optimizer_matches_rule_and_state_dict_round_trip(tmp_path):
    rule = GeneralistRule(hidden=8, lr_free=True, d0=3e-4)
    meta = {k: v.double() for k, v in _random_meta(rule, seed=5).items()}
    meta["log_lr"], meta["log_d0"] = torch.tensor(0.0, dtype=torch.float64), torch.tensor(math.log(3e-4), dtype=torch.float64)
    opt = check_optimizer_matches_rule(tmp_path, rule, meta)
    loaded, _ = load_checkpoint(tmp_path / "g.pt")
    assert loaded.lr_free and loaded.d0 == 3e-4 and loaded.moment_rows == 8
    assert all(s["momenta"].shape[0] == 8 for s in opt.state.values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="choose one"):
        GeneralistRule(adaptive=True, lr_free=True)
    with pytest.raises(ValueError, match="d0"):
        GeneralistRule(lr_free=True, d0=0.0)
