"""GradMetaNet and weight-space learned optimizers: saved, loaded, and used on MLPs of other sizes."""
import pytest
import torch
from torch import nn

from gradmeta.lopt import (GradientSetOptimizer, GradientStatsLO, GradMetaNetLO, LearnedOptimizer, PerParamMLP,
                           WeightSpaceLO, load_checkpoint, save_checkpoint)
from gradmeta.models import classification_loss, mlp


def _rules(task):
    return [GradMetaNetLO(task, gmn_channels=2, hidden=8, examples=8, avg_decay=0.8, layers=2),
            GradMetaNetLO(task, gmn_channels=2, variant="plusplus", weight_aware=True, hidden=8, layers=1),
            WeightSpaceLO(task, out_channels=2, hidden=8),
            GradMetaNetLO(task, gmn_channels=2, hidden=8, examples=8, layers=2, extra_gate=True),
            GradMetaNetLO(task, gmn_channels=2, variant="plusplus", hidden=8, layers=1, neuron_attention="linear"),
            GradientStatsLO(task, hidden=8, examples=8, extra_gate=True, center_branch=True),
            GradMetaNetLO(task, gmn_channels=2, hidden=8, examples=8, layers=2, product="bilinear")]


def _trained_looking(lo, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in lo.init_meta(seed).items()}


@pytest.mark.parametrize("which", [0, 1, 2, 3, 4, 5, 6])
def test_round_trip_gives_the_same_rule_and_the_same_steps(small_digits, tmp_path, which):
    lo = _rules(small_digits)[which]
    meta = _trained_looking(lo)
    path = save_checkpoint(tmp_path / "lo.pt", lo, meta, task=small_digits.name)
    with pytest.raises(ValueError, match="GradientSetOptimizer.from_checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="GradientSetOptimizer.from_checkpoint"):
        LearnedOptimizer(small_digits.model.parameters(), checkpoint=path)
    lo2, meta2 = load_checkpoint(path, model=small_digits.model)
    assert type(lo2) is type(lo) and lo2.config() == lo.config() and lo2.base.config() == lo.base.config()
    assert meta2.keys() == meta.keys() and all(torch.equal(meta2[k], meta[k]) for k in meta)
    params = small_digits.init(0)
    batch = tuple(b[0] for b in small_digits.batches(torch.Generator().manual_seed(0), 1))
    a = lo.step(small_digits, meta, params, lo.init(params), batch)
    b = lo2.step(small_digits, meta2, params, lo2.init(params), batch)
    for k in params:
        assert torch.equal(a[0][k], b[0][k])


@pytest.mark.parametrize("which", [0, 2, 4, 5, 6])
def test_a_saved_rule_optimises_mlps_of_other_widths_and_sizes(small_digits, tmp_path, which):
    lo = _rules(small_digits)[which]  # built on 64-8-10
    path = save_checkpoint(tmp_path / "lo.pt", lo, _trained_looking(lo))
    gen = torch.Generator().manual_seed(0)
    for widths in ([64, 32, 10], [64, 64, 10], [20, 64, 32, 5]):
        torch.manual_seed(0)
        model = mlp(widths)
        opt = GradientSetOptimizer.from_checkpoint(model, classification_loss, path, lr=0.5)
        X, y = torch.randn(32, widths[0], generator=gen), torch.randint(0, widths[-1], (32,), generator=gen)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        losses = [float(opt.step(lambda: (X, y))) for _ in range(15)]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
        assert all(not torch.equal(before[k], v) for k, v in model.named_parameters())


def test_learned_neuron_ids_tie_a_rule_to_its_input_and_output_sizes(small_digits, tmp_path):
    lo = GradMetaNetLO(small_digits, gmn_channels=2, hidden=8, neuron_ids="learned")
    path = save_checkpoint(tmp_path / "lo.pt", lo, lo.init_meta(0))
    GradientSetOptimizer.from_checkpoint(mlp([64, 32, 10]), classification_loss, path)  # hidden width is free
    with pytest.raises(ValueError, match=r"'gmn\.encoder\.ids\..*' has shape \(64, 8\).*needs \(20, 8\)"):
        GradientSetOptimizer.from_checkpoint(mlp([20, 32, 10]), classification_loss, path)
    with pytest.raises(ValueError, match="neuron_ids must be one of"):
        GradMetaNetLO(small_digits, neuron_ids="sinusoid")


@pytest.mark.parametrize("cls", [GradMetaNetLO, WeightSpaceLO])
def test_conv_inner_models_are_refused_naming_the_layer(small_digits, cls):
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with pytest.raises(ValueError, match=r"module '0' \(Conv2d\).*Supported inner models: MLPs"):
        cls(conv)
    lo = cls(small_digits)
    with pytest.raises(ValueError, match=r"module '0' \(Conv2d\)"):
        GradientSetOptimizer(conv, classification_loss, lo, lo.init_meta(0))
    with pytest.raises(TypeError, match="use LearnedOptimizer"):
        GradientSetOptimizer(mlp([4, 3]), classification_loss, PerParamMLP(), PerParamMLP().init_meta(0))
    with pytest.raises(TypeError, match="cannot save a"):
        save_checkpoint("unused.pt", object(), {})
