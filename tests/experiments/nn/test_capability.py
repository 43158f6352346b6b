"""Task ``nn_capability`` (gradmeta/experiments/nn/capability.py): targets against slow references,
the per-layer normalisation, and a tiny run of the spec through ``gradmeta.run``."""
import json
from pathlib import Path

import pytest
import torch

from gradmeta.experiments.nn.capability import (MODELS, TARGETS, _DEGREE, _prepare, make_sets,
                                             normalise_layers, render_capability, targets_of)
from gradmeta.run import SpecError, load_spec, run_spec
from tests.conftest import naive_per_example_grads

SPEC = Path(__file__).resolve().parents[3] / "tasks" / "nn_capability.toml"
TINY = """
[data]
set_size = 4
train_sets = 3
test_sets = 2
[model]
channels = 4
heads = 1
flat_hidden = 8
deepsets_hidden = 4
[train]
steps = 2
batch_sets = 2
warmup = 1
log_every = 1
"""


def _tiny_spec(tmp_path, extra=""):
    base = SPEC.read_text().split("\n[", 1)[0]  # the spec's top-level keys, tables replaced below
    path = tmp_path / "tiny.toml"
    path.write_text(base + "\n" + extra + TINY)
    return path


def test_targets_match_naive_per_example_gradients():
    torch.manual_seed(0)
    from gradmeta.models import classification_loss, mlp
    model = mlp([5, 4, 3], activation="tanh").double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    import gradmeta as gm
    gs = gm.collect_gradients(model, classification_loss, x, y)
    t = targets_of(gs, "2", damping=0.1)
    pe = naive_per_example_grads(model, classification_loss, x, y)
    for n, g in pe.items():
        torch.testing.assert_close(t["mean_grad"][n], g.mean(0))
        torch.testing.assert_close(t["fisher_diag"][n], (g ** 2).mean(0))
        torch.testing.assert_close(t["adam_direction"][n], g.mean(0) / ((g ** 2).mean(0) + 1e-8).sqrt())
    G = torch.cat([pe["2.weight"].flatten(1), pe["2.bias"]], 1)
    F = sum(torch.outer(r, r) for r in G) / len(G)
    ng = torch.linalg.solve(F + 0.1 * F.diagonal().mean() * torch.eye(len(F), dtype=F.dtype), G.mean(0))
    torch.testing.assert_close(torch.cat([t["natural_grad_last_layer"]["2.weight"].flatten(),
                                          t["natural_grad_last_layer"]["2.bias"]]), ng)


@pytest.mark.parametrize("mode", ["layer", "neuron"])
def test_normalisation_is_a_per_parameter_rescaling(mode):
    (gs, t), = make_sets(1, [64, 6, 10], 5, seed=3)
    gs_n, s = normalise_layers(gs, per_neuron=mode == "neuron")
    for n in gs.layer_names:  # unit RMS per layer and factor, or per column (zero columns stay 0)
        for f in (gs_n[n].activations, gs_n[n].backprops):
            r = f.pow(2).mean((0, 1)).sqrt() if mode == "neuron" else f.pow(2).mean().sqrt()[None]
            r = r[r > 0]
            torch.testing.assert_close(r, torch.ones_like(r), rtol=1e-5, atol=0)
    pe, pe_n = gs.per_example_grads(), gs_n.per_example_grads()
    for p in pe:
        torch.testing.assert_close(pe_n[p] * s[p], pe[p])
    # the mean gradient and Fisher diagonal of the normalised set, mapped back with s^degree,
    # are the targets of the original set
    for target in ("mean_grad", "fisher_diag"):
        (_, mult, tgt, _), = _prepare([(gs, t)], target, mode)
        back = targets_of(gs_n, "2")[target]
        for p in tgt:
            torch.testing.assert_close(back[p] * mult[p], tgt[p], rtol=1e-4, atol=1e-7)
    assert set(_DEGREE) == set(TARGETS)


def test_tiny_spec_runs_every_target_and_model(tmp_path):
    out = run_spec(_tiny_spec(tmp_path), tmp_path / "run", progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "complete" and m["step"] == m["total_steps"] == len(TARGETS) * len(MODELS) * 2
    for t in TARGETS:
        for name in MODELS:
            v = m["summary"][f"rel_error/{t}/{name}"]
            assert v is not None and 0 <= v < float("inf"), (t, name, v)  # 2 steps: only finite
            assert len(m["history"][f"{t}/{name}"]["train_loss"]) == 2
    assert (out / "capability.png").stat().st_size > 0
    table = render_capability(load_spec(out / "spec.resolved.toml"), m["summary"])
    assert table.count("\n| ") == 1 + len(TARGETS) and "GradMetaNet++" in table


def test_stop_and_resume_give_the_full_run(tmp_path):
    extra = 'targets = ["fisher_diag"]\nmodels = ["GradMetaNet", "averaged-gradient net"]\n'
    spec = _tiny_spec(tmp_path, extra)
    out = run_spec(spec, tmp_path / "a", max_steps=2, progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "stopped" and list(m["history"]) == ["fisher_diag/GradMetaNet"]
    run_spec(spec, out, resume=True, progress=False)
    full = run_spec(spec, tmp_path / "b", progress=False)
    got, want = (json.loads((d / "metrics.json").read_text())["summary"] for d in (out, full))
    assert got.keys() == want.keys()
    for k in want:
        if k.startswith("rel_error"):
            assert got[k] == pytest.approx(want[k], rel=1e-6), k


def test_spec_errors_name_the_key(tmp_path):
    with pytest.raises(SpecError, match="models"):
        run_spec(_tiny_spec(tmp_path, 'models = ["GradMetaNet+++"]\n'), tmp_path / "c", progress=False)
    with pytest.raises(SpecError, match="train.batch_sets"):
        run_spec(_tiny_spec(tmp_path), tmp_path / "d", progress=False, overrides=["train.batch_sets=4"])


def _old_train(net, train, tr, seed):
    """The loop ``train_eval`` used before ``gradmeta._training`` (reference): returns the history."""
    import math
    import statistics

    from gradmeta.experiments.nn.capability import _predict, rel_err

    opt = torch.optim.Adam(net.parameters(), lr=tr["lr"])
    steps, warm = tr["steps"], tr["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warm, 1)) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    g = torch.Generator().manual_seed(seed)
    hist, acc = {"step": [], "train_loss": []}, []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train), (tr["batch_sets"],), generator=g).tolist()
        items = [train[i] for i in idx]
        loss = sum(rel_err(p, it[2], sq=True) for p, it in zip(_predict(net, items), items)) / len(items)
        opt.zero_grad()
        loss.backward()
        if tr["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), tr["clip"])
        opt.step()
        sched.step()
        acc.append(loss.item())
        if step % tr["log_every"] == 0 or step == steps:
            hist["step"].append(step)
            hist["train_loss"].append(statistics.mean(acc))
            acc = []
    return hist


def test_training_loop_is_bitwise_the_old_loop():
    warmup, clip = 2, 0.5
    from gradmeta.experiments.nn.capability import capability_models, train_eval
    from gradmeta.models import mlp

    widths = [64, 6, 10]
    sets = make_sets(4, widths, 4, seed=0)
    m = {"channels": 4, "set_layers": 1, "neuron_layers": 1, "heads": 1, "flat_hidden": 8, "deepsets_hidden": 4,
         "features": "square"}
    tr = {"steps": 5, "batch_sets": 3, "lr": 3e-2, "warmup": warmup, "clip": clip, "log_every": 2}
    new, old = (capability_models(mlp(widths), m, ["GradMetaNet"], seed=0)["GradMetaNet"] for _ in range(2))
    items = _prepare(sets, "fisher_diag", "neuron", new.spec, "square")
    got = train_eval(new, items, items[:1], tr, seed=7)["history"]
    assert got == _old_train(old, items, tr, seed=7) and got["step"] == [2, 4, 5]
    assert all(torch.equal(p, q) for p, q in zip(new.parameters(), old.parameters()))
