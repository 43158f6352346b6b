"""The per-parameter MLP learned optimizer: untrained = SGDM, non-finite skip, clipping, vmap."""
import math

import pytest
import torch
from torch.func import grad, vmap

from gradmeta.lopt import DECAYS, PerParamMLP
from tests.lopt.references import per_param_mlp_update, task_trajectory


def test_untrained_learned_optimizer_is_sgd_with_momentum(small_digits):
    lo = PerParamMLP(hidden=16, lr=0.2, max_update=10.0)  # clipping off: exactly SGDM
    meta = lo.init_meta(0)
    params = small_digits.init(1)
    batches = small_digits.batches(torch.Generator().manual_seed(0), 20)
    ref = task_trajectory(small_digits, params, lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9), batches, 20)
    state = lo.init(params)
    for t in range(20):
        batch = (batches[0][t], batches[1][t])
        g = grad(lambda p: small_digits.loss(p, batch).mean())(params)
        params, state = lo.update(meta, g, state, params)
        for k in params:
            torch.testing.assert_close(params[k], ref[t][k], rtol=1e-4, atol=1e-6)
    assert int(state.step) == 20 and int(state.skipped) == 0


def test_momenta_are_emas_with_the_six_decays():
    assert DECAYS == (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
    lo = PerParamMLP(hidden=4)
    params = {"w": torch.zeros(3)}
    state = lo.init(params)
    g1, g2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 0.0])
    _, state = lo.update(lo.init_meta(), {"w": g1}, state, params)
    _, state = lo.update(lo.init_meta(), {"w": g2}, state, params)
    for i, b in enumerate(DECAYS):
        torch.testing.assert_close(state.momenta["w"][i], b * (1 - b) * g1 + (1 - b) * g2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_update_is_skipped_and_counted(bad):
    lo = PerParamMLP(hidden=4)
    meta = lo.init_meta(0)
    params = {"a": torch.randn(3, 2), "b": torch.randn(2)}
    state = lo.init(params)
    params, state = lo.update(meta, {"a": torch.ones(3, 2), "b": torch.ones(2)}, state, params)
    grads = {"a": torch.ones(3, 2), "b": torch.tensor([1.0, bad])}
    new, new_state = lo.update(meta, grads, state, params)
    for k in params:
        assert torch.equal(new[k], params[k])
        assert torch.equal(new_state.momenta[k], state.momenta[k])
        assert torch.equal(new_state.second[k], state.second[k])
    assert new_state.step == state.step == 1 and int(new_state.skipped) == 1
    # a learned network that outputs NaN is caught as well (±inf outputs are clamped)
    meta_bad = dict(meta, b2=torch.tensor([float("nan"), 0.0]))
    new, s2 = lo.update(meta_bad, {"a": torch.ones(3, 2), "b": torch.ones(2)}, state, params)
    assert torch.equal(new["a"], params["a"]) and int(s2.skipped) == 1


def test_updates_are_clipped():
    lo = PerParamMLP(hidden=4, lr=1.0, max_update=0.05)
    params = {"w": torch.zeros(5)}
    new, _ = lo.update(lo.init_meta(), {"w": torch.tensor([-10.0, -0.01, 0.0, 0.01, 10.0])}, lo.init(params), params)
    torch.testing.assert_close(new["w"], torch.tensor([0.05, 0.01, 0.0, -0.01, -0.05]))


def test_learned_update_changes_steps_and_vmap_matches_loop(small_digits):
    lo = PerParamMLP(hidden=8)
    meta = lo.init_meta(0)
    meta["w2"] = 0.1 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    params = small_digits.init_stacked([0, 1, 2])
    batch = tuple(x[:3] for x in small_digits.batches(torch.Generator().manual_seed(0), 3))

    def step(p, b):
        g = grad(lambda q: small_digits.loss(q, b).mean())(p)
        return lo.update(meta, g, lo.init(p), p)[0]

    batched = vmap(step)(params, batch)
    for i in range(3):
        single = step({k: v[i] for k, v in params.items()}, tuple(x[i] for x in batch))
        for k in single:
            torch.testing.assert_close(batched[k][i], single[k], rtol=1e-5, atol=1e-6)
    untrained = PerParamMLP(hidden=8)
    p0 = {k: v[0] for k, v in params.items()}
    g0 = grad(lambda q: small_digits.loss(q, tuple(x[0] for x in batch)).mean())(p0)
    plain = untrained.update(untrained.init_meta(0), g0, untrained.init(p0), p0)[0]
    assert any(not torch.allclose(plain[k], batched[k][0]) for k in plain)
    assert math.isclose(float(meta["log_lr"].exp()), lo.lr, rel_tol=1e-6)


@pytest.mark.parametrize("extra_features", [0, 3])
def test_update_equals_the_tensor_by_tensor_reference(extra_features):
    g = torch.Generator().manual_seed(0)
    lo = PerParamMLP(hidden=8, extra_features=extra_features)
    meta = {k: v.double() for k, v in lo.init_meta(0).items()}
    meta["w2"] = 0.3 * torch.randn(8, 2, generator=g, dtype=torch.float64)
    params = {"a.weight": torch.randn(5, 4, generator=g, dtype=torch.float64),
              "a.bias": torch.randn(5, generator=g, dtype=torch.float64),
              "b.weight": torch.randn(3, 5, generator=g, dtype=torch.float64)}
    state = lo.init(params)
    extra = {k: torch.randn(*v.shape, extra_features, generator=g, dtype=torch.float64)
             for k, v in params.items()} if extra_features else None
    for _ in range(3):  # a few steps, so that momenta and the step count are non-trivial
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
        want, want_m, want_v = per_param_mlp_update(lo, meta, grads, state, params, extra)
        params, state = lo.update(meta, grads, state, params, extra)
        for k in params:
            torch.testing.assert_close(params[k], want[k], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(state.momenta[k], want_m[k], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(state.second[k], want_v[k], rtol=1e-12, atol=1e-12)


def _gated_reference_meta(meta: dict) -> dict:
    """The ungated layout of a gated rule's meta-parameters: ``w0`` = base rows, gate · ``w0_extra``, time rows."""
    nb = PerParamMLP.n_base_features - 9  # base feature rows; the 9 time-scale rows come last
    w0 = torch.cat([meta["w0"][:nb], meta["extra_gate"].unsqueeze(1) * meta["w0_extra"], meta["w0"][nb:]])
    return {**{k: v for k, v in meta.items() if k not in ("w0_extra", "extra_gate")}, "w0": w0}


def test_gated_extra_features_start_as_the_plain_rule_and_open_by_their_gates():
    g = torch.Generator().manual_seed(0)
    lo, plain = PerParamMLP(hidden=8, extra_features=3, extra_gate=True), PerParamMLP(hidden=8)
    meta, plain_meta = lo.init_meta(4), plain.init_meta(4)
    # the same draw as the rule without extra features, plus the gated rows and zero gates
    assert set(meta) == set(plain_meta) | {"w0_extra", "extra_gate"}
    assert all(torch.equal(meta[k], plain_meta[k]) for k in plain_meta)
    assert meta["extra_gate"].shape == (3,) and not meta["extra_gate"].any() and meta["w0_extra"].shape == (3, 8)
    assert lo.config()["extra_gate"] and "extra_gate" not in plain.config()
    assert PerParamMLP(**lo.config()).init_meta(4).keys() == meta.keys()
    with pytest.raises(ValueError, match="extra_gate must be True or False"):
        PerParamMLP(extra_features=2, extra_gate="yes")
    meta = {k: v.double() for k, v in meta.items()}
    meta["w2"] = 0.3 * torch.randn(8, 2, generator=g, dtype=torch.float64)  # a rule that moves off SGDM
    params = {"a.weight": torch.randn(5, 4, generator=g, dtype=torch.float64),
              "a.bias": torch.randn(5, generator=g, dtype=torch.float64)}
    grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    extra = {k: 10 * torch.randn(*v.shape, 3, generator=g, dtype=torch.float64) for k, v in params.items()}
    plain64 = {k: meta[k] for k in plain_meta}
    # gates at zero: exactly the plain rule's step, whatever the extra features
    got = lo.update(meta, grads, lo.init(params), params, extra)[0]
    want = plain.update(plain64, grads, plain.init(params), params)[0]
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    # open gates: the ungated reference with the gated rows in w0
    meta["extra_gate"] = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    got = lo.update(meta, grads, lo.init(params), params, extra)[0]
    want = per_param_mlp_update(lo, _gated_reference_meta(meta), grads, lo.init(params), params, extra)[0]
    moved = plain.update(plain64, grads, plain.init(params), params)[0]
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    assert any(not torch.allclose(got[k], moved[k]) for k in params)
