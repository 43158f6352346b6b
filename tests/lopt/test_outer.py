"""Outer trainers: PES is unbiased on a quadratic, TBPTT torch.func == higher, ES, state round trip."""
import math

import pytest
import torch
from torch.func import grad

from gradmeta.lopt import PES, MetaTraining, PerParamMLP, QuadraticTask, TruncatedBackprop, es_grad, unroll
from tests.lopt.references import LearnedSGD


def _exact_full_unroll_grad(task, lo, meta, horizon):
    """d/dmeta of the mean training loss over the whole horizon, by backprop through all steps."""
    params = task.init(0)
    batches = task.batches(torch.Generator().manual_seed(0), horizon)

    def f(m):
        return unroll(task, lo, m, params, lo.init(params), batches)[2].mean()

    return grad(f)(meta)


def test_pes_is_unbiased_over_truncations_on_a_quadratic():
    # noise = init_scale = 0: every inner run is the same deterministic problem, so the only
    # randomness is PES's own; the truncation estimates averaged over the horizon must match the
    # gradient of the full-horizon meta-loss (PES corrects the truncation bias of TBPTT).
    task = QuadraticTask(dim=4, batch_size=2, noise=0.0, init_scale=0.0, init_mean=1.0)
    lo, horizon, K = LearnedSGD(), 20, 5
    meta = {"log_lr": torch.tensor(-1.5)}
    exact = _exact_full_unroll_grad(task, lo, meta, horizon)["log_lr"]
    pes = PES(task, lo, particles=4000, truncation=K, horizon=horizon, sigma=0.01)
    gen = torch.Generator().manual_seed(0)
    state, est, truncated = pes.init(meta, gen), 0.0, 0.0
    for _ in range(horizon // K):
        tb = TruncatedBackprop(task, lo, particles=1, truncation=K, horizon=horizon)
        p = {k: v[:1] for k, v in state["params"].items()}
        truncated += tb.grad(meta, {"params": p, "opt_state": {"count": state["opt_state"]["count"][:1]},
                                    "step": state["step"]}, torch.Generator())[0]["log_lr"] / (horizon // K)
        g, state, info = pes.grad(meta, state, gen)
        est += g["log_lr"] / (horizon // K)
    assert int(state["step"]) == 0  # reset at the end of the horizon
    assert abs(float(est - exact)) < 0.05 * abs(float(exact)), (float(est), float(exact))
    # truncated backprop alone is biased here (it ignores the effect on later truncations)
    assert abs(float(truncated - exact)) > 0.2 * abs(float(exact)), (float(truncated), float(exact))


def test_es_matches_exact_gradient_on_a_quadratic():
    task = QuadraticTask(dim=4, batch_size=2, noise=0.0, init_scale=0.0, init_mean=1.0)
    lo, meta = LearnedSGD(), {"log_lr": torch.tensor(-1.0)}
    exact = _exact_full_unroll_grad(task, lo, meta, 10)["log_lr"]
    g, info = es_grad(task, lo, meta, torch.Generator().manual_seed(0), particles=4000, horizon=10, sigma=0.01)
    assert abs(float(g["log_lr"] - exact)) < 0.05 * abs(float(exact))
    assert info["meta_loss"] > 0


def test_truncated_backprop_func_and_higher_give_the_same_meta_gradient(small_digits):
    lo = PerParamMLP(hidden=8)
    meta = lo.init_meta(0)
    meta["w2"] = 0.05 * torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    out = {}
    for backend in ("func", "higher"):
        tb = TruncatedBackprop(small_digits, lo, particles=2, truncation=3, horizon=6, backend=backend)
        gen = torch.Generator().manual_seed(0)
        state = tb.init(meta, gen)
        g, state, info = tb.grad(meta, state, gen)
        out[backend] = (g, state, info)
    g_func, g_higher = out["func"][0], out["higher"][0]
    assert any(float(v.abs().max()) > 0 for v in g_func.values())
    for k in meta:
        torch.testing.assert_close(g_higher[k], g_func[k], rtol=1e-4, atol=1e-7)
    assert out["func"][2]["meta_loss"] == pytest.approx(out["higher"][2]["meta_loss"], rel=1e-6)
    for k in out["func"][1]["params"]:
        torch.testing.assert_close(out["higher"][1]["params"][k], out["func"][1]["params"][k])


def test_pes_state_round_trips_through_leaves_and_resets(small_digits):
    lo = PerParamMLP(hidden=8)
    meta = lo.init_meta(0)
    pes = PES(small_digits, lo, particles=4, truncation=2, horizon=4)
    gen = torch.Generator().manual_seed(0)
    state = pes.init(meta, gen)
    g, state, info = pes.grad(meta, state, gen)
    assert int(state["step"]) == 2 and set(g) == set(meta) and info["skipped"] == 0
    # antithetic pairs share their initialisation
    w = state["params"]["0.weight"]
    assert not torch.equal(w[0], w[1])  # after different perturbations
    back = pes.from_leaves(meta, [x.clone() for x in pes.to_leaves(state)])
    g1, s1, _ = pes.grad(meta, back, torch.Generator().manual_seed(5))
    g2, s2, _ = pes.grad(meta, state, torch.Generator().manual_seed(5))
    for k in meta:
        assert torch.equal(g1[k], g2[k])
    assert int(s1["step"]) == 0 and all(float(v.abs().sum()) == 0 for v in s1["accum"].values())
    with pytest.raises(ValueError, match="pairs"):
        PES(small_digits, lo, particles=3, truncation=2, horizon=4)


class _ShiftedSGD(LearnedSGD):
    """``θ ← θ − exp(log_lr)·∇ − shift``: two meta-parameters."""

    def init_meta(self, seed=0):
        return {"log_lr": torch.tensor(-1.0), "shift": torch.tensor(0.02)}

    def update(self, meta, grads, state, params):
        new, state = super().update(meta, grads, state, params)
        return {k: v - meta["shift"] for k, v in new.items()}, state


class _ConstShiftSGD(_ShiftedSGD):
    """The same rule with ``shift`` a constant: the reference for holding it fixed."""

    def init_meta(self, seed=0):
        return {"log_lr": torch.tensor(-1.0)}

    def update(self, meta, grads, state, params):
        return super().update({**meta, "shift": torch.tensor(0.02)}, grads, state, params)


@pytest.mark.parametrize("method", ["pes", "tbptt"])
def test_fixed_meta_parameters_are_not_perturbed_and_get_zero_gradient(method):
    # the estimate for the trained names equals, bitwise, that of a rule in which the fixed names are
    # constants (the same random draws), and the fixed names' estimate is exactly zero
    task = QuadraticTask(dim=4, batch_size=2, noise=0.1)
    make = (lambda lo, **kw: PES(task, lo, particles=6, truncation=3, horizon=6, sigma=0.05, **kw)) if method == "pes" \
        else (lambda lo, **kw: TruncatedBackprop(task, lo, particles=3, truncation=3, horizon=6, **kw))
    est, ref = make(_ShiftedSGD(), fixed=["shift"]), make(_ConstShiftSGD())
    meta, meta_ref = _ShiftedSGD().init_meta(), _ConstShiftSGD().init_meta()
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    sa, sb = est.init(meta, ga), ref.init(meta_ref, gb)
    for _ in range(3):  # across a reset of the particles
        g, sa, ia = est.grad(meta, sa, ga)
        h, sb, ib = ref.grad(meta_ref, sb, gb)
        assert torch.equal(g["log_lr"], h["log_lr"]) and float(g["log_lr"].abs()) > 0
        assert float(g["shift"]) == 0.0 and ia["meta_loss"] == ib["meta_loss"]
    with pytest.raises(ValueError, match="fixed names meta-parameters _ShiftedSGD does not have: scale"):
        make(_ShiftedSGD(), fixed=["scale"])


def test_meta_training_leaves_fixed_meta_parameters_where_they_are():
    from gradmeta.lopt import MetaTraining

    task = QuadraticTask(dim=4, batch_size=2, noise=0.1)
    lo = _ShiftedSGD()
    mt = MetaTraining(lo, PES(task, lo, particles=4, truncation=2, horizon=4, fixed=["shift"]), meta_lr=0.05)
    for _ in range(3):
        mt.step()
    assert torch.equal(mt.meta["shift"].detach(), lo.init_meta()["shift"]) and float(mt.meta["log_lr"].detach()) != -1.0
    with pytest.raises(ValueError, match="nothing is left to meta-train"):
        MetaTraining(lo, PES(task, lo, particles=4, truncation=2, horizon=4, fixed=["shift", "log_lr"]))


def test_a_non_finite_meta_gradient_is_a_zero_step_and_leaves_the_meta_parameters_finite(small_digits):
    lo = PerParamMLP(hidden=8)
    pes = PES(small_digits, lo, particles=2, truncation=2, horizon=4)
    real = pes.grad
    calls = []

    def poisoned(meta, state, generator):  # the second estimate has a NaN and an inf in it
        g, state, info = real(meta, state, generator)
        calls.append(1)
        if len(calls) == 2:
            g = dict(g)
            g["w1"] = g["w1"].clone()
            g["w1"].view(-1)[0], g["w1"].view(-1)[1] = float("nan"), float("inf")
        return g, state, info

    pes.grad = poisoned
    mt = MetaTraining(lo, pes, meta_lr=0.01, seed=0)
    first = mt.step()
    before = {k: v.clone() for k, v in mt.detached().items()}
    second = mt.step()
    after = mt.detached()
    assert math.isfinite(first["grad_norm"]) and not math.isfinite(second["grad_norm"])
    assert all(torch.isfinite(v).all() for v in after.values())
    # a zero gradient: Adam's step is its momentum alone, the same for every name as a zero estimate gives
    ref = MetaTraining(lo, PES(small_digits, lo, particles=2, truncation=2, horizon=4), meta_lr=0.01, seed=0)
    ref.step()
    for v in ref.meta.values():
        v.grad = torch.zeros_like(v)
    ref.opt.step()
    for k in after:
        torch.testing.assert_close(after[k], ref.detached()[k], rtol=0, atol=0)
    assert any(not torch.equal(after[k], before[k]) for k in after)  # the momentum did move them
