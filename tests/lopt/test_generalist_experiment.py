"""The generalist experiment: resumed meta-training equals an uninterrupted run (also for the
lr-free rule with the best-validation-loss objective); held-out tasks are disjoint from the
training distribution; the LSTM and CNN tasks run under the vmapped rule; evaluation on a training
task and the ``compare`` summary of the benchmark script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradmeta.experiments.lopt import generalist as G
from gradmeta.lopt import GeneralistRule, learned_curves


@pytest.mark.parametrize("extra", [{}, {"lr_free": True, "objective": "valid_min"}])
def test_resumed_meta_training_is_bitwise_uninterrupted(tmp_path, extra):
    kw = dict(iterations=4, horizons=(4, 6), particles=2, hidden=4, tasks=("tabular_classification", "tabular_regression"),
              **extra)
    whole = G.meta_train(tmp_path / "a", **kw)
    G.meta_train(tmp_path / "b", max_steps=1, **kw)
    G.meta_train(tmp_path / "b", max_steps=2, **kw)
    resumed = G.meta_train(tmp_path / "b", **kw)
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    init = GeneralistRule(hidden=4, lr_free=extra.get("lr_free", False)).init_meta(0)
    assert set(init) == set(whole) and any(not torch.equal(whole[k], v) for k, v in init.items())


def test_resuming_with_other_settings_is_refused(tmp_path):
    kw = dict(iterations=2, horizons=(4,), particles=2, hidden=4, tasks=("tabular_regression",))
    G.meta_train(tmp_path, max_steps=1, **kw)
    before = (tmp_path / "meta_checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="particles was 2, now 4"):
        G.meta_train(tmp_path, **{**kw, "particles": 4})
    assert (tmp_path / "meta_checkpoint.pt").read_bytes() == before  # nothing lost
    G.meta_train(tmp_path, **kw)  # the same settings resume
    assert len(json.loads((tmp_path / "history.json").read_text())) == 2


def test_heldout_is_disjoint_from_training():
    assert len(G.HELDOUT_TASKS) == 8 and not set(G.HELDOUT_TASKS) & set(G.TRAIN_TASKS)
    assert len(G.VALIDATION_TASKS) == 6 and not set(G.VALIDATION_TASKS) & (set(G.TRAIN_TASKS) | set(G.HELDOUT_TASKS))


def test_lstm_and_cnn_run_under_the_rule():
    from gradmeta.data import stdlib_docstring_corpus
    from gradmeta.lopt import SupervisedTask
    from gradmeta.models import classification_loss

    lstm = G.LSTMLanguageTask(stdlib_docstring_corpus(("textwrap",)), batch_size=2, seq_len=4)
    X, y = torch.randn(40, 1, 12, 12), torch.randint(0, 3, (40,))
    cnn = SupervisedTask(G.SmallCNN(12, 2, 3), classification_loss, X, y, X, y, 8)
    rule = GeneralistRule(hidden=4, total_steps=3)
    for task in (lstm, cnn):
        out = learned_curves(task, rule, rule.init_meta(0), [1, 2], 3, 1)
        assert torch.isfinite(out["test_loss"]).all() and out["test_loss"][0, :, -1].mean() < out["test_loss"][0, :, 0].mean()


def test_eval_on_a_training_task_and_compare(tmp_path):
    """``evaluate_suite`` takes meta-training task names too; ``compare`` counts wins per folder."""
    from gradmeta.lopt import save_checkpoint

    outs = []
    for name, rule in (("adamlike", GeneralistRule(hidden=4)), ("lrfree", GeneralistRule(hidden=4, lr_free=True))):
        ck = save_checkpoint(tmp_path / f"{name}.pt", rule, rule.init_meta(0))
        res = G.evaluate_suite(ck, tmp_path / name, steps=4, seeds=(1,), tasks=("tabular_regression",), eval_every=2)
        assert set(res) == {"tabular_regression"} and len(res["tabular_regression"]["best"]) == 1
        outs.append(str(tmp_path / name))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "lopt_generalist.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, str(script), "compare", "--out", *outs, "--labels", "A", "B", "--name", "cmp"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "benchmarks" / "results" / "cmp.json").read_text())["candidates"]
    for label, out in zip("AB", outs):
        r = json.loads((Path(out) / "heldout.json").read_text())["tabular_regression"]
        assert summary[label]["wins"] == int(r["best"][0] <= r["adam_best"][0])
        assert summary[label]["geo_mean_best_over_adam"] == pytest.approx(r["best"][0] / r["adam_best"][0])
    bad = subprocess.run([sys.executable, str(script), "compare", "--out", *outs, "--labels", "A", "--name", "cmp"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "2 --out folders but 1 --labels" in bad.stderr


def test_user_models_benchmark_smoke():
    """``benchmarks/lopt_generalist_user_models.py --quick``: the default optimizer on a HF GPT-2, an
    ``nn.TransformerEncoder`` and a CNN, three steps each, finite losses and no skipped step."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "lopt_generalist_user_models.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in done.stdout.splitlines() if r.startswith("| ") and "| 3 |" in r]
    assert len(rows) == 6  # printed as they come, then in the final table
    for r in rows[:3]:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert all(0 < float(c) < 100 for c in cells[2:5]) and cells[5] == "0"


def test_steptime_refuses_mismatched_labels(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "lopt_generalist.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    bad = subprocess.run([sys.executable, str(script), "steptime", "--out", "x", "--checkpoint", "generalist", "digits",
                          "--labels", "A"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "2 --checkpoint files but 1 --labels" in bad.stderr
