"""The generalist experiment: resumed meta-training equals an uninterrupted run; held-out tasks are
disjoint from the training distribution; the LSTM and CNN tasks run under the vmapped rule."""
import torch

from gradmeta.experiments.lopt import generalist as G
from gradmeta.lopt import GeneralistRule, learned_curves


def test_resumed_meta_training_is_bitwise_uninterrupted(tmp_path):
    kw = dict(iterations=4, horizons=(4, 6), particles=2, hidden=4, tasks=("tabular_classification", "tabular_regression"))
    whole = G.meta_train(tmp_path / "a", **kw)
    G.meta_train(tmp_path / "b", max_steps=1, **kw)
    G.meta_train(tmp_path / "b", max_steps=2, **kw)
    resumed = G.meta_train(tmp_path / "b", **kw)
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert any(not torch.equal(whole[k], v) for k, v in GeneralistRule(hidden=4).init_meta(0).items())


def test_heldout_is_disjoint_from_training():
    assert len(G.HELDOUT_TASKS) == 8 and not set(G.HELDOUT_TASKS) & set(G.TRAIN_TASKS)


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
