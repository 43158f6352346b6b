"""LearnedOptimizer: a training loop, the shipped checkpoint, state_dict round trip, errors."""
import pytest
import torch

from gradmeta.lopt import DEFAULT_CHECKPOINT, LearnedOptimizer, PerParamMLP, load_checkpoint, save_checkpoint
from gradmeta.models import classification_loss, mlp


@pytest.fixture
def checkpoint(tmp_path):
    lo = PerParamMLP(hidden=8, lr=0.1)
    meta = lo.init_meta(0)
    meta["w2"] = 0.05 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    return save_checkpoint(tmp_path / "lo.pt", lo, meta, task="test")


def _data(n=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_training_loop_reduces_the_loss(checkpoint):
    torch.manual_seed(0)
    model = mlp([6, 16, 3])
    opt = LearnedOptimizer(model, checkpoint)
    x, y = _data()
    losses = [float(opt.step(lambda: classification_loss(model(x), y))) for _ in range(60)]
    assert losses[-1] < 0.6 * losses[0]
    assert opt.skipped_steps == 0
    # the returned value is the mean of the closure's per-example losses before the update
    with torch.no_grad():
        before = classification_loss(model(x), y).mean()
    assert float(opt.step(lambda: classification_loss(model(x), y))) == pytest.approx(float(before), rel=1e-6)


def test_state_dict_round_trip_continues_identically(checkpoint):
    x, y = _data()
    torch.manual_seed(0)
    a = mlp([6, 16, 3])
    b = mlp([6, 16, 3])
    b.load_state_dict(a.state_dict())
    opt_a = LearnedOptimizer(a, checkpoint)
    for _ in range(5):
        opt_a.step(lambda: classification_loss(a(x), y))
    b.load_state_dict(a.state_dict())
    opt_b = LearnedOptimizer(b, checkpoint=None if DEFAULT_CHECKPOINT.is_file() else checkpoint)
    sd = opt_a.state_dict()
    assert "lopt" in sd and sd["lopt"]["config"]["hidden"] == 8
    opt_b.load_state_dict(sd)
    for _ in range(5):
        la = opt_a.step(lambda: classification_loss(a(x), y))
        lb = opt_b.step(lambda: classification_loss(b(x), y))
        assert torch.equal(la, lb)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_shipped_checkpoint_loads_weights_only_and_spec_lies_next_to_it():
    assert DEFAULT_CHECKPOINT.is_file(), "the package must ship a learned-optimizer checkpoint"
    assert DEFAULT_CHECKPOINT.with_suffix(".toml").is_file(), "the spec that produced it must lie next to it"
    blob = torch.load(DEFAULT_CHECKPOINT, weights_only=True)
    assert blob["format"] == "gradmeta.lopt/1"
    lo, meta = load_checkpoint()
    model = mlp([64, 32, 10])
    opt = LearnedOptimizer(model)
    x = torch.rand(32, 64)
    y = torch.randint(0, 10, (32,))
    assert torch.isfinite(opt.step(lambda: classification_loss(model(x), y)))


def test_closure_must_return_per_example_losses(checkpoint):
    model = mlp([6, 4, 3])
    opt = LearnedOptimizer(model, checkpoint)
    x, y = _data(8)
    with pytest.raises(ValueError, match=r"per-example losses of shape \(B,\), got \(\)"):
        opt.step(lambda: classification_loss(model(x), y).mean())
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LearnedOptimizer(model, "/nonexistent/lo.pt")


def test_non_finite_step_is_skipped(checkpoint):
    model = mlp([6, 4, 3])
    opt = LearnedOptimizer(model, checkpoint)
    x, y = _data(8)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: classification_loss(model(x), y) * float("nan"))
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
