"""LearnedOptimizer as a torch.optim optimizer: API behaviours against explicit expectations, and the
fused bucket update against the tensor-by-tensor reference."""
import pytest
import torch
from torch import nn

from gradmeta.lopt import (DEFAULT_CHECKPOINT, NAMED_CHECKPOINTS, GeneralistRule, LearnedOptimizer, LOState,
                           PerParamMLP, load_checkpoint, save_checkpoint)
from gradmeta.models import classification_loss, mlp
from tests.lopt.references import per_param_mlp_update


@pytest.fixture
def checkpoint(tmp_path):
    lo = PerParamMLP(hidden=8, lr=0.1)
    meta = lo.init_meta(0)
    meta["w2"] = 0.05 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    return save_checkpoint(tmp_path / "lo.pt", lo, meta, task="test", horizon=50)


def _data(n=128, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g).to(dtype)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return mlp([6, 16, 3]).to(dtype)


def _backward(model, x, y, scale=1.0):
    loss = classification_loss(model(x), y).mean()
    (loss * scale).backward()
    return loss.detach()


def _train(model, opt, steps, x, y):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(float(_backward(model, x, y)))
        opt.step()
    return losses


def test_ordinary_training_loop_with_scheduler_and_clipping(checkpoint):
    model = _model()
    opt = LearnedOptimizer(model.parameters(), lr=1.0, checkpoint=checkpoint)
    # the rule has no momentum hyperparameter to cycle (its momenta are learned features)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=60, cycle_momentum=False)
    x, y = _data()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        losses.append(float(_backward(model, x, y)))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    assert losses[-1] < 0.6 * losses[0] and opt.skipped_steps == 0
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])
    for make in (lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5),
                 lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10),
                 lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (t + 1))):
        o = LearnedOptimizer(model.parameters(), checkpoint=checkpoint)
        s = make(o)
        _train(model, o, 2, x, y)
        s.step()
        assert o.param_groups[0]["lr"] == pytest.approx(s.get_last_lr()[0]) and o.param_groups[0]["lr"] < 1


def test_standard_closure_semantics(checkpoint):
    model = _model()
    opt = LearnedOptimizer(model.parameters(), checkpoint=checkpoint)
    x, y = _data()
    calls = []

    def closure():
        opt.zero_grad()
        loss = classification_loss(model(x), y).mean()
        loss.backward()
        calls.append(1)
        return loss

    with torch.no_grad():
        before = classification_loss(model(x), y).mean()
    out = opt.step(closure)
    assert len(calls) == 1 and float(out.detach()) == pytest.approx(float(before), rel=1e-6)
    assert opt.step() is None  # without a closure: the gradients already in .grad


def _ref_steps(lo, meta, params, grads_seq, lrs, wd):
    """The tensor-by-tensor reference of several steps, with the lr multiplier and weight decay."""
    state = LOState(torch.zeros((), dtype=torch.float64), {k: torch.zeros(6, *v.shape, dtype=v.dtype)
                                                           for k, v in params.items()},
                    {k: torch.zeros_like(v) for k, v in params.items()}, torch.zeros((), dtype=torch.float64))
    for grads in grads_seq:
        want, m, v = per_param_mlp_update(lo, meta, grads, state, params)
        params = {k: params[k] * (1 - lrs[k] * wd[k]) - lrs[k] * (params[k] - want[k]) for k in params}
        state = LOState(state.step + 1, m, v, state.skipped)
    return params, state


@pytest.mark.parametrize("chunk", [1 << 14, 7])  # one chunk; several, the last one partial
def test_fused_update_equals_the_tensor_by_tensor_reference_in_float64(checkpoint, chunk, monkeypatch):
    monkeypatch.setattr("gradmeta.lopt._fused.CHUNK_ROWS", chunk)
    lo, meta = load_checkpoint(checkpoint)
    meta = {k: v.double() for k, v in meta.items()}
    g = torch.Generator().manual_seed(1)
    shapes = {"a": (5, 4), "b": (5,), "c": (), "d": (3, 5)}  # a 0-dim parameter among them
    init = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    ps = {k: nn.Parameter(v.clone()) for k, v in init.items()}
    lrs, wd = {"a": 1.0, "b": 1.0, "c": 0.5, "d": 0.5}, {"a": 0.0, "b": 0.0, "c": 0.1, "d": 0.1}
    opt = LearnedOptimizer([{"params": [ps["a"], ps["b"]]}, {"params": [ps["c"], ps["d"]], "lr": 0.5,
                                                             "weight_decay": 0.1}], checkpoint=checkpoint)
    grads_seq = [{k: 3 * torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()} for _ in range(4)]
    for grads in grads_seq:
        for k, p in ps.items():
            p.grad = grads[k].clone()
        opt.step()
    want, state = _ref_steps(lo, meta, init, grads_seq, lrs, wd)
    for k, p in ps.items():
        torch.testing.assert_close(p.detach(), want[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["momenta"], state.momenta[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["second"], state.second[k], rtol=1e-12, atol=1e-12)
        assert int(opt.state[p]["step"]) == 4


def test_lr_is_a_multiplier_and_zero_means_no_movement(checkpoint):
    x, y = _data(dtype=torch.float64)
    deltas = {}
    for lr in (0.0, 0.5, 1.0):
        model = _model(torch.float64)
        before = [p.detach().clone() for p in model.parameters()]
        opt = LearnedOptimizer(model.parameters(), lr=lr, checkpoint=checkpoint)
        _backward(model, x, y)
        opt.step()
        deltas[lr] = [p.detach() - b for p, b in zip(model.parameters(), before)]
        assert int(next(iter(opt.state.values()))["step"]) == 1
    assert all(torch.equal(d, torch.zeros_like(d)) for d in deltas[0.0])
    for half, full in zip(deltas[0.5], deltas[1.0]):
        torch.testing.assert_close(half, 0.5 * full, rtol=1e-12, atol=1e-15)
        assert full.abs().max() > 0


def test_accumulated_gradients_equal_the_full_batch(checkpoint):
    x, y = _data(dtype=torch.float64)
    a, b = _model(torch.float64), _model(torch.float64)
    opt_a = LearnedOptimizer(a.parameters(), checkpoint=checkpoint)
    opt_b = LearnedOptimizer(b.parameters(), checkpoint=checkpoint)
    for _ in range(3):
        opt_a.zero_grad()
        opt_b.zero_grad()
        _backward(a, x, y)
        _backward(b, x[:64], y[:64], 0.5)
        _backward(b, x[64:], y[64:], 0.5)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def test_grad_scaler_with_bf16_autocast_on_cpu(checkpoint):
    x, y = _data()
    a, b = _model(), _model()
    opt_a = LearnedOptimizer(a.parameters(), checkpoint=checkpoint)
    opt_b = LearnedOptimizer(b.parameters(), checkpoint=checkpoint)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = classification_loss(model(x), y).mean()
            if model is a:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)  # scaling by a power of two is undone exactly
    before = [p.detach().clone() for p in a.parameters()]
    opt_a.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = classification_loss(a(x), y).mean() * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt_a)  # inf gradients: the scaler skips the step
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_any_float_dtype_with_float32_state_for_16_bit(checkpoint, dtype):
    x, y = _data(dtype=dtype)
    model = _model(dtype)
    opt = LearnedOptimizer(model.parameters(), checkpoint=checkpoint)
    losses = _train(model, opt, 40, x, y)
    assert losses[-1] < 0.8 * losses[0]
    s = opt.state[model[0].weight]
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert s["momenta"].dtype == s["second"].dtype == want and model[0].weight.dtype == dtype


def test_two_dtypes_in_one_optimizer_step_as_separately(checkpoint):
    g = torch.Generator().manual_seed(0)
    p32, p64 = nn.Parameter(torch.randn(4, 3, generator=g)), nn.Parameter(torch.randn(5, generator=g).double())
    q32, q64 = nn.Parameter(p32.detach().clone()), nn.Parameter(p64.detach().clone())
    both = LearnedOptimizer([p32, p64], checkpoint=checkpoint)
    alone = [LearnedOptimizer([q32], checkpoint=checkpoint), LearnedOptimizer([q64], checkpoint=checkpoint)]
    for _ in range(3):
        g32, g64 = torch.randn(4, 3, generator=g), torch.randn(5, generator=g).double()
        p32.grad, p64.grad, q32.grad, q64.grad = g32, g64, g32.clone(), g64.clone()
        both.step()
        for o in alone:
            o.step()
    assert torch.equal(p32, q32) and torch.equal(p64, q64) and p64.dtype == torch.float64


def test_missing_and_sparse_gradients_are_skipped(checkpoint):
    emb = nn.Embedding(10, 3, sparse=True)
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([used, unused, emb.weight], checkpoint=checkpoint)
    before = emb.weight.detach().clone()
    (emb(torch.tensor([1, 2])).sum() + (used * 2).sum()).backward()
    opt.step()
    assert not torch.equal(used, torch.ones(3))
    assert torch.equal(unused, torch.ones(3)) and not opt.state[unused]
    assert torch.equal(emb.weight, before) and not opt.state[emb.weight]


def test_add_param_group_and_state_dict_round_trip_bitwise(checkpoint):
    x, y = _data()
    a, b = _model(), _model()
    extra_a, extra_b = nn.Parameter(torch.ones(())), nn.Parameter(torch.ones(()))
    opt_a = LearnedOptimizer(list(a.parameters())[:2], checkpoint=checkpoint)
    _train(a, opt_a, 3, x, y)
    opt_a.add_param_group({"params": list(a.parameters())[2:] + [extra_a], "lr": 0.5})
    for _ in range(2):
        opt_a.zero_grad()
        _backward(a, x, y)
        extra_a.grad = torch.tensor(0.3)
        opt_a.step()
    assert opt_a.param_groups[1]["lr"] == 0.5 and int(opt_a.state[extra_a]["step"]) == 2
    assert int(opt_a.state[a[0].weight]["step"]) == 5
    b.load_state_dict(a.state_dict())
    extra_b.data.copy_(extra_a.data)
    opt_b = LearnedOptimizer([{"params": list(b.parameters())[:2]}, {"params": list(b.parameters())[2:] + [extra_b]}],
                             checkpoint=None if DEFAULT_CHECKPOINT.is_file() else checkpoint)
    sd = opt_a.state_dict()
    opt_b.load_state_dict(sd)
    assert opt_b.lo.hidden == 8 and opt_b.param_groups[1]["lr"] == 0.5
    for pa, pb in zip(opt_a.param_groups[1]["params"], opt_b.param_groups[1]["params"]):
        for k in opt_a.state[pa]:
            assert torch.equal(opt_a.state[pa][k], opt_b.state[pb][k])
    for _ in range(3):
        for m, o, e in ((a, opt_a, extra_a), (b, opt_b, extra_b)):
            o.zero_grad()
            _backward(m, x, y)
            e.grad = torch.tensor(-0.2)
            o.step()
    for pa, pb in zip(list(a.parameters()) + [extra_a], list(b.parameters()) + [extra_b]):
        assert torch.equal(pa, pb)


def test_low_precision_state_survives_a_state_dict_round_trip(checkpoint):
    x, y = _data(dtype=torch.bfloat16)
    model = _model(torch.bfloat16)
    opt = LearnedOptimizer(model.parameters(), checkpoint=checkpoint)
    _train(model, opt, 2, x, y)
    opt2 = LearnedOptimizer(model.parameters(), checkpoint=checkpoint)
    opt2.load_state_dict(opt.state_dict())
    for p in model.parameters():
        assert opt2.state[p]["momenta"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["momenta"], opt.state[p]["momenta"])


def test_old_module_form_and_bad_arguments_are_refused(checkpoint):
    model = _model()
    with pytest.raises(TypeError, match=r"LearnedOptimizer\(model.parameters\(\)\)"):
        LearnedOptimizer(model)
    with pytest.raises(TypeError, match="checkpoint=..."):
        LearnedOptimizer(model.parameters(), str(checkpoint))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LearnedOptimizer(model.parameters(), checkpoint="/nonexistent/lo.pt")
    with pytest.raises(ValueError, match="total_steps"):
        LearnedOptimizer(model.parameters(), checkpoint=checkpoint, total_steps=0)


def test_total_steps_rescales_the_step_encoding(checkpoint):
    x, y = _data(dtype=torch.float64)
    out = {}
    for total in (None, 50, 500):  # the checkpoint was meta-trained on horizon 50
        model = _model(torch.float64)
        _train(model, LearnedOptimizer(model.parameters(), checkpoint=checkpoint, total_steps=total), 3, x, y)
        out[total] = [p.detach() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(out[None], out[50]))
    assert any(not torch.equal(a, b) for a, b in zip(out[None], out[500]))


@pytest.mark.parametrize("name", sorted(NAMED_CHECKPOINTS))
def test_shipped_checkpoints_load_weights_only_and_their_settings_lie_next_to_them(name):
    path = NAMED_CHECKPOINTS[name]
    assert path.is_file(), f"the package must ship the {name} learned-optimizer checkpoint"
    assert path.with_suffix(".toml").is_file(), "the settings that produced it must lie next to it"
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == "gradmeta.lopt/1"
    model = mlp([64, 32, 10])
    opt = LearnedOptimizer(model.parameters(), checkpoint=name, total_steps=600)
    x, y = torch.rand(32, 64), torch.randint(0, 10, (32,))
    _backward(model, x, y)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if name == "digits":  # horizon 300 read from the spec next to it
        assert opt._time_scale == 0.5
    else:  # the generalist conditions on t / total_steps itself
        assert opt._time_scale == 1.0 and opt.lo.total_steps == 600


def test_default_checkpoint_is_the_generalist():
    assert DEFAULT_CHECKPOINT == NAMED_CHECKPOINTS["generalist"]
    assert isinstance(LearnedOptimizer(mlp([4, 3]).parameters()).lo, GeneralistRule)
    assert isinstance(LearnedOptimizer(mlp([4, 3]).parameters(), checkpoint="digits").lo, PerParamMLP)


def test_non_finite_step_is_skipped(checkpoint):
    model = _model()
    opt = LearnedOptimizer(model.parameters(), checkpoint=checkpoint)
    x, y = _data(8)
    _train(model, opt, 1, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    opt.zero_grad()
    _backward(model, x, y, float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for k in ("momenta", "second", "step"):
        assert torch.equal(opt.state[model[0].weight][k], state[k])
