"""Task lora_predict on a tiny zoo: every model trains, metrics are sane, rank split, checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from gradmeta import lora
from gradmeta.experiments.lora.predict import kendall_tau, membership_metrics, regression_metrics
from gradmeta.run import run_spec


def test_metrics_against_obvious_references():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, generator=g), torch.randint(0, 5, (40,), generator=g).double()
    assert kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x.numpy(), y.numpy()).statistic, abs=1e-12)
    m = regression_metrics(y, y)
    assert m["r2"] == 1.0 and m["tau"] == pytest.approx(1.0)
    assert regression_metrics(torch.full((40,), y.mean().item()), y)["r2"] == pytest.approx(0.0, abs=1e-12)
    mm = membership_metrics(torch.tensor([[1.0, -1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert mm == {"label_acc": 0.75, "exact": 0.5}


def _spec(tmp_path, zoo, body):
    p = tmp_path / "t.toml"
    p.write_text(f'task = "lora_predict"\nzoo = "{zoo}"\nseeds = [0]\n{body}\n[train]\nepochs = 2\n'
                 '[speed]\nn_adapters = 2\n')
    return p


def test_predict_accuracy_all_models(zoo_run, tmp_path):
    _, zoo = zoo_run
    out = run_spec(_spec(tmp_path, zoo, 'target = "accuracy"'), tmp_path / "run", progress=False)
    s = json.loads((out / "metrics.json").read_text())["summary"]
    for name in ["GLNet", "FactorMLP", "DenseMLP", "SVDMLP", "ProcrustesMLP", "LayerTransformer"]:
        assert f"{name}/r2_mean" in s and f"{name}/tau_mean" in s
        assert f"{name}/r2_raw_mean" in s and f"{name}/mse_raw_mean" in s  # before clipping to the training range
    assert s["speed/predict_disk_s"] > 0 and s["speed/evaluate_disk_s"] > 0
    assert json.loads((out / "metrics.json").read_text())["plots"] == ["predicted_vs_true.png"]
    assert (out / "predicted_vs_true.png").stat().st_size > 1000
    net, extra = lora.load_model(out / "glnet.pt")
    assert isinstance(net, lora.GLNet) and extra["targets"] == ["test_acc"] and extra["regression"]


def test_membership_and_rank_split(zoo_run, tmp_path):
    _, zoo = zoo_run
    body = 'target = "membership"\nsplit = "rank"\ntrain_ranks = [2]\ntest_ranks = [4]\nmodels = ["GLNet", "SVDMLP"]'
    out = run_spec(_spec(tmp_path, zoo, body), tmp_path / "run", progress=False)
    s = json.loads((out / "metrics.json").read_text())["summary"]
    assert 0 <= s["GLNet/label_acc_mean"] <= 1 and s["n_train"] + s["n_test"] == 12
    ds = lora.LoraDataset(zoo / "adapters", zoo / "labels.csv")
    assert s["n_train"] == sum(a["0"].rank == 2 for a, _ in ds)


def test_missing_zoo_is_a_spec_error(tmp_path):
    from gradmeta.run import SpecError
    with pytest.raises(SpecError, match="build the zoo first"):
        run_spec(_spec(tmp_path, tmp_path / "nozoo", ""), tmp_path / "run", progress=False)


def test_cli_lora_predict_and_info(zoo_run, tmp_path, monkeypatch, capsys):
    import gradmeta.cli as cli
    _, zoo = zoo_run
    out = run_spec(_spec(tmp_path, zoo, 'target = "loss"\nmodels = ["GLNet"]'), tmp_path / "run", progress=False)
    dirs = [str(zoo / "adapters" / "00000"), str(zoo / "adapters" / "00001")]
    assert cli.main(["lora", "predict", "--model", str(out / "glnet.pt"), "--json", *dirs]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["adapter"] for r in rows] == dirs and all("test_loss" in r for r in rows)
    net, extra = lora.load_model(out / "glnet.pt")
    want = net(lora.load_adapter(dirs[1]))[0, 0] * extra["target_std"][0] + extra["target_mean"][0]
    want = want.clamp(extra["target_min"][0], extra["target_max"][0])  # clipped to the training targets' range
    assert rows[1]["test_loss"] == pytest.approx(want.item(), rel=1e-5)
    assert cli.main(["lora", "info", dirs[0]]) == 0
    assert "linear" in capsys.readouterr().out


def test_shipped_specs_resolve():
    from pathlib import Path

    from gradmeta.run import load_spec, resolve_spec
    specs = sorted((Path(__file__).resolve().parents[3] / "tasks").glob("lora_*.toml"))
    assert len(specs) >= 5
    for p in specs:
        resolve_spec(load_spec(p), p)


def _old_train_model(net, pairs, y, loss_fn, epochs, batch_size, lr, weight_decay, seed, on_epoch=None):
    """The loop ``train_model`` used before ``gradmeta._training`` (reference)."""
    from gradmeta.experiments.lora.predict import _index

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    N = y.shape[0]
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(N, generator=g)
        total = 0.0
        for s in range(0, N, batch_size):
            idx = perm[s:s + batch_size]
            loss = loss_fn(net(_index(pairs, idx)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch, total / N)
    return net.eval()


@pytest.mark.parametrize("name", ["GLNet", "DenseMLP"])
def test_training_loop_is_bitwise_the_old_loop(name):
    import torch.nn.functional as F

    from gradmeta.experiments.lora.predict import train_model

    g = torch.Generator().manual_seed(0)
    shapes = {"a": (5, 4), "b": (3, 5)}
    pairs = {k: (torch.randn(10, n, 2, generator=g), torch.randn(10, m, 2, generator=g)) for k, (n, m) in shapes.items()}
    y = torch.randn(10, 1, generator=g)
    nets, curves = [], ([], [])
    for _ in range(2):
        torch.manual_seed(1)
        nets.append(lora.MODELS[name](shapes, 1).fit_input_scale(pairs))
    kw = dict(epochs=3, batch_size=4, lr=1e-2, weight_decay=1e-2, seed=5)
    train_model(nets[0], pairs, y, F.mse_loss, on_epoch=lambda e, l: curves[0].append((e, l)), **kw)
    _old_train_model(nets[1], pairs, y, F.mse_loss, on_epoch=lambda e, l: curves[1].append((e, l)), **kw)
    assert curves[0] == curves[1] and [e for e, _ in curves[0]] == [0, 1, 2]
    assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters()))
    assert not nets[0].training


def test_glnet_variant_selected_on_inner_validation(zoo_run):
    """fit_glnet_selected keeps the variant of lowest held-out training loss (rule "one_se": the
    first within one standard error of it); the spectral variant it refits on every training
    adapter is exactly SVDMLP trained the same way."""
    from gradmeta.experiments.lora.predict import fit_glnet_selected, train_model

    _, zoo = zoo_run
    ds = lora.LoraDataset(zoo / "adapters", zoo / "labels.csv")
    pairs = lora.stack_factors(list(ds.adapters), rank=4)
    y = ds.label_tensor(["test_acc"])
    y = (y - y.mean()) / y.std()
    shapes = ds.adapters[0].shapes
    train = {"epochs": 3, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-4}
    mse = torch.nn.functional.mse_loss
    build = lambda kw: lora.GLNet(shapes, 1, **kw)
    net, info = fit_glnet_selected(build, pairs, y, mse, 0, 0.25, train)
    losses = {v: info[f"val_loss_{v}"] for v in lora.GLNet.VARIANTS}
    excess = {v: info[f"val_excess_{v}"] for v in lora.GLNet.VARIANTS}
    assert all(excess[v][0] == pytest.approx(losses[v] - min(losses.values()), abs=1e-6) for v in losses)
    assert info["variant"] == min(losses, key=losses.get)
    _, info_se = fit_glnet_selected(build, pairs, y, mse, 0, 0.25, train, rule="one_se")
    assert info_se["variant"] == next(v for v in lora.GLNet.VARIANTS if excess[v][0] <= excess[v][1])
    assert (net.sv_k > 0, net.residual) == {"spectral": (True, False), "spectral+equivariant": (True, True),
                                            "equivariant": (False, True)}[info["variant"]]
    forced, _ = fit_glnet_selected(lambda kw: build({"residual": False}), pairs, y, mse, 0, 0.0, train)
    torch.manual_seed(0)
    svd = lora.SVDMLP(shapes, 1).fit_input_scale(pairs)
    train_model(svd, pairs, y, mse, seed=0, **train)
    with torch.no_grad():
        assert torch.equal(forced(pairs), svd(pairs))
    assert fit_glnet_selected(build, pairs, y, mse, 0, 0.0, train)[1] == {"variant": "spectral+equivariant"}


def test_results_table_from_run_folders_and_json_copies(tmp_path):
    from gradmeta.experiments.lora.predict import results_table

    reg = {"summary": {"GLNet/r2_mean": 0.9, "GLNet/r2_std": 0.01, "GLNet/tau_mean": 0.8, "GLNet/tau_std": 0.02,
                       "SVDMLP/r2_mean": 0.7, "SVDMLP/r2_std": 0.03, "SVDMLP/tau_mean": 0.6, "SVDMLP/tau_std": 0.0}}
    mem = {"summary": {"GLNet/label_acc_mean": 0.95, "GLNet/label_acc_std": 0.005}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(reg))
    (tmp_path / "mem.json").write_text(json.dumps(mem))
    lines = results_table({"acc": tmp_path / "run", "member": tmp_path / "mem.json"}).splitlines()
    assert lines[0] == "| model | acc r2 | acc tau | member label_acc |"
    assert lines[2] == "| GLNet | 0.900 ± 0.010 | 0.800 ± 0.020 | 0.950 ± 0.005 |"
    assert lines[3] == "| SVDMLP | 0.700 ± 0.030 | 0.600 ± 0.000 | - |"


def test_glnet_selection_on_explicit_held_out_rows(zoo_run):
    """held_out (the largest training rank under a rank split) replaces the random share: the
    spectral variant's validation loss equals SVDMLP trained on the other rows, scored on those."""
    from gradmeta.experiments.lora.predict import _index, fit_glnet_selected, train_model

    _, zoo = zoo_run
    ds = lora.LoraDataset(zoo / "adapters", zoo / "labels.csv")
    pairs = lora.stack_factors(list(ds.adapters), rank=4)
    y = ds.label_tensor(["test_acc"])
    y = (y - y.mean()) / y.std()
    held = [i for i, a in enumerate(ds.adapters) if a["0"].rank == 4]
    fit = [i for i in range(len(ds)) if i not in held]
    assert held and fit
    train = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-4}
    mse = torch.nn.functional.mse_loss
    shapes = ds.adapters[0].shapes
    _, info = fit_glnet_selected(lambda kw: lora.GLNet(shapes, 1, **kw), pairs, y, mse, 0, 0.2, train, held_out=held)
    torch.manual_seed(0)
    svd = lora.SVDMLP(shapes, 1).fit_input_scale(_index(pairs, fit))
    train_model(svd, _index(pairs, fit), y[fit], mse, seed=0, **train)
    with torch.no_grad():
        assert info["val_loss_spectral"] == float(mse(svd(_index(pairs, held)), y[held]))
    with pytest.raises(ValueError, match="no adapter to train on"):
        fit_glnet_selected(lambda kw: lora.GLNet(shapes, 1, **kw), pairs, y, mse, 0, 0.2, train,
                           held_out=list(range(len(ds))))
