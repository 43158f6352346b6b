"""Collection behaviour: contexts, dtypes, layer selection, and every error path."""
import pytest
import torch
from torch import nn

import gradmeta as gm
from gradmeta.grads import GradientCollectionError
from gradmeta.models import classification_loss, mlp
from tests.conftest import assert_dicts_close, naive_per_example_grads


def _data(B=4, d=5, classes=3, dtype=torch.float64):
    return torch.randn(B, d, dtype=dtype), torch.randint(0, classes, (B,))


def _no_hooks_left(model):
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_works_under_no_grad_and_in_eval_mode():
    model = mlp([5, 6, 3]).double().eval()
    x, y = _data()
    with torch.no_grad():
        gs = gm.collect_gradients(model, classification_loss, x, y)
    assert_dicts_close(gs.per_example_grads(), naive_per_example_grads(model, classification_loss, x, y))


def test_inference_mode_is_refused():
    model = mlp([5, 6, 3])
    x, y = _data(dtype=torch.float32)
    with torch.inference_mode(), pytest.raises(GradientCollectionError, match="inference_mode"):
        gm.collect_gradients(model, classification_loss, x, y)


def test_float32():
    model = mlp([5, 6, 3])
    x, y = _data(dtype=torch.float32)
    gs = gm.collect_gradients(model, classification_loss, x, y)
    assert gs["0"].activations.dtype == torch.float32
    assert_dicts_close(gs.per_example_grads(), gm.per_example_grads(model, classification_loss, x, y),
                       atol=1e-6)


def test_layer_subset_and_frozen_parameters():
    model = mlp([5, 6, 4, 3]).double()
    model[0].bias.requires_grad_(False)
    x, y = _data()
    gs = gm.collect_gradients(model, classification_loss, x, y, layers=["0", "4"])
    assert gs.layer_names == ["0", "4"]
    assert gs.param_names == ["0.weight", "4.weight", "4.bias"]
    want = naive_per_example_grads(model, classification_loss, x, y)
    got = gs.per_example_grads()
    assert_dicts_close(got, {k: want[k] for k in got})
    own = torch.cat([want[k].flatten(1) for k in got], 1)
    torch.testing.assert_close(gs.grad_norms(), own.norm(dim=1), atol=1e-10, rtol=0)


def test_unknown_layer_name():
    model = mlp([5, 6, 3])
    with pytest.raises(GradientCollectionError, match="nope"):
        gm.collect_gradients(model, classification_loss, *_data(dtype=torch.float32), layers=["nope"])


@pytest.mark.parametrize("bn", [nn.BatchNorm1d(6), nn.BatchNorm1d(6, track_running_stats=False).eval()])
def test_batch_mixing_layer_is_named(bn):
    model = nn.Sequential(nn.Linear(5, 6), bn, nn.Linear(6, 3)).double()
    with pytest.raises(GradientCollectionError, match=r"'1' \(BatchNorm1d\)"):
        gm.collect_gradients(model, classification_loss, *_data())
    with pytest.raises(GradientCollectionError, match=r"'1' \(BatchNorm1d\)"):
        gm.per_example_grads(model, classification_loss, *_data())


def test_batchnorm_in_eval_mode_with_running_stats_is_fine():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double().eval()
    x, y = _data()
    assert_dicts_close(gm.per_example_grads(model, classification_loss, x, y),
                       naive_per_example_grads(model, classification_loss, x, y))


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return x * self.gain


def test_unsupported_parameter_module_takes_the_exact_fallback():
    model = nn.Sequential(nn.Linear(5, 6), _Scale(), nn.Linear(6, 3)).double()
    x, y = _data()
    gs = gm.collect_gradients(model, classification_loss, x, y)
    assert gs.fallback_params == ["1.gain"]
    want = naive_per_example_grads(model, classification_loss, x, y)
    assert_dicts_close(gs.per_example_grads(), want)
    flat = torch.cat([want[k].flatten(1) for k in want], 1)
    torch.testing.assert_close(gs.gram(), flat @ flat.T, atol=1e-10, rtol=0)
    # ... and the torch.func path agrees
    assert_dicts_close(gm.per_example_grads(model, classification_loss, x, y), want)
    # ... and supported layers can still be collected by name
    assert gm.collect_gradients(model, classification_loss, x, y, layers=["0", "2"]).layer_names == ["0", "2"]


def test_subclass_overriding_forward_is_not_silently_treated_as_linear():
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Odd(5, 3)).double()
    x, y = _data()
    gs = gm.collect_gradients(model, classification_loss, x, y)
    assert gs.fallback_params == ["0.weight", "0.bias"]
    assert_dicts_close(gs.per_example_grads(), naive_per_example_grads(model, classification_loss, x, y))


@pytest.mark.parametrize("bad", [lambda out, y: classification_loss(out, y).mean(),
                                 lambda out, y: classification_loss(out, y)[:, None]])
def test_loss_with_wrong_shape_shows_it(bad):
    model = mlp([5, 6, 3]).double()
    with pytest.raises(GradientCollectionError, match=r"\(B,\) = \(4,\), got"):
        gm.collect_gradients(model, bad, *_data())
    assert _no_hooks_left(model)
    with pytest.raises(GradientCollectionError, match="got"):
        gm.per_example_grads(model, bad, *_data())


def test_hooks_removed_when_forward_or_loss_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            self.lin(x)
            raise ValueError("forward failed")

    model = Boom()
    with pytest.raises(ValueError, match="forward failed"):
        gm.collect_gradients(model, classification_loss, *_data(dtype=torch.float32))
    assert _no_hooks_left(model)

    def bad_loss(out, y):
        raise KeyError("loss failed")

    model = mlp([5, 6, 3])
    with pytest.raises(KeyError, match="loss failed"):
        gm.collect_gradients(model, bad_loss, *_data(dtype=torch.float32))
    assert _no_hooks_left(model)
    gm.collect_gradients(model, classification_loss, *_data(dtype=torch.float32))
    assert _no_hooks_left(model)


def test_weight_tying_is_summed():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx).mean(1))

    idx, y = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3,))
    model = Tied().double()
    want = naive_per_example_grads(model, classification_loss, idx, y)
    flat = torch.cat([want[k].flatten(1) for k in want], 1)
    for layers in (None, ["head"], ["emb"]):      # restricting to one use never drops the other
        gs = gm.collect_gradients(model, classification_loss, idx, y, layers=layers)
        assert gs.shared_params == ["emb.weight"] and not gs.fallback_params
        assert_dicts_close(gs.per_example_grads(), want)
        torch.testing.assert_close(gs.grad_norms(), flat.norm(dim=1), atol=1e-10, rtol=0)
        torch.testing.assert_close(gs.gram(), flat @ flat.T, atol=1e-10, rtol=0)
        assert_dicts_close(gs.fisher_diagonal(), {k: (g ** 2).mean(0) for k, g in want.items()})


def test_unsupported_configurations_are_named():
    emb = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(GradientCollectionError, match=r"'0' \(Embedding\) has max_norm"):
        gm.collect_gradients(emb, classification_loss, torch.randint(0, 5, (2, 2)), torch.tensor([0, 1]))


def test_non_batch_first_input_takes_the_exact_fallback():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):                     # (B, T, d) fed to the layer as (T, B, d)
            return self.lin(x.transpose(0, 1)).mean(0)

    model, x, y = Transposed().double(), torch.randn(4, 2, 5, dtype=torch.float64), torch.zeros(4).long()
    gs = gm.collect_gradients(model, classification_loss, x, y)
    assert gs.fallback_params == ["lin.weight", "lin.bias"]
    assert_dicts_close(gs.per_example_grads(), naive_per_example_grads(model, classification_loss, x, y))


def test_in_place_ops_after_a_layer_do_not_change_its_backprops():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x, y = _data()
    assert_dicts_close(gm.collect_gradients(model, classification_loss, x, y).per_example_grads(),
                       naive_per_example_grads(model, classification_loss, x, y))


def test_dropout_in_train_mode_uses_one_mask_like_a_plain_step():
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double().train()
    x, y = _data()
    torch.manual_seed(3)
    gs = gm.collect_gradients(model, classification_loss, x, y)
    torch.manual_seed(3)
    loss = classification_loss(model(x), y).mean()
    want = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    assert_dicts_close(gs.mean_grad(), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = mlp([5, 6, 3]).double()
    x, y = _data()
    want = gm.collect_gradients(model, classification_loss, x, y).per_example_grads()
    got = gm.collect_gradients(model.cuda(), classification_loss, x.cuda(), y.cuda()).per_example_grads()
    assert_dicts_close({k: v.cpu() for k, v in got.items()}, want)
