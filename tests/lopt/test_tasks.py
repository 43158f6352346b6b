"""Every inner task runs without downloads: generated stand-in files and a small docstring corpus."""
import numpy as np
import pytest
import torch
from torch.func import vmap

from gradmeta.lopt import PerParamMLP, char_lm, digits_mlp, image_mlp, make_task, unroll
from tests.data.conftest import cifar_batch, write_idx, write_py3_pickle


def _check_task(task, n_params_in=None):
    params = task.init(0)
    assert all(torch.equal(params[k], task.init(0)[k]) for k in params)  # deterministic in the seed
    assert any(not torch.equal(params[k], task.init(1)[k]) for k in params)
    batch = task.batches(torch.Generator().manual_seed(0), 3)
    one = tuple(b[0] for b in batch)
    losses = task.loss(params, one)
    assert losses.shape == (task.batch_size,) and torch.isfinite(losses).all()
    assert task.test_loss(params).shape == () and torch.isfinite(task.test_loss(params))
    lo = PerParamMLP(hidden=4)
    meta = lo.init_meta()
    stacked = task.init_stacked([0, 1, 2])
    steps = tuple(b.unsqueeze(0) for b in batch)  # one step, batch per run
    new, state, l = vmap(lambda p, b: unroll(task, lo, meta, p, lo.init(p), b), in_dims=(0, 1))(stacked, steps)
    assert l.shape == (3, 1) and int(state.skipped.sum()) == 0
    if n_params_in is not None:
        assert params["0.weight"].shape[1] == n_params_in


def test_digits_task():
    task = digits_mlp()
    assert task.widths == [64, 32, 10] and task.batch_size == 128
    _check_task(task, 64)


def test_fashion_mnist_8x8_from_generated_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))
    task = make_task("fashion_mnist", data_root=str(tmp_path), batch_size=8)
    assert task.widths == [64, 32, 10]
    _check_task(task, 64)


@pytest.mark.parametrize("dataset,hidden", [("cifar10", 32), ("cifar100", 128)])
def test_cifar_8x8_from_generated_pickles(tmp_path, dataset, hidden):
    rng = np.random.default_rng(0)
    if dataset == "cifar10":
        d = tmp_path / "cifar-10-batches-py"
        for i in range(1, 6):
            write_py3_pickle(d / f"data_batch_{i}", cifar_batch(rng, 8, {"labels": 10}))
        write_py3_pickle(d / "test_batch", cifar_batch(rng, 8, {"labels": 10}))
    else:
        d = tmp_path / "cifar-100-python"
        for name in ("train", "test"):
            write_py3_pickle(d / name, cifar_batch(rng, 16, {"fine_labels": 100, "coarse_labels": 20}))
    task = image_mlp(dataset, tmp_path, batch_size=8)
    assert task.widths[:2] == [3 * 64, hidden]
    _check_task(task, 192)


def test_char_lm_on_a_small_docstring_corpus():
    from gradmeta.data import stdlib_docstring_corpus

    task = char_lm(stdlib_docstring_corpus(["json", "textwrap", "string"], val_fraction=0.3))
    assert (task.batch_size, task.seq_len) == (8, 8)
    assert sum(p.numel() for p in task.init(0).values()) > 0
    _check_task(task)


def test_unknown_task_name():
    with pytest.raises(ValueError, match="unknown task 'mnst'"):
        make_task("mnst")


def test_validation_split_and_valid_objective():
    from gradmeta.lopt import PES

    full, held = digits_mlp(hidden=[4], batch_size=8), digits_mlp(hidden=[4], batch_size=8, valid_fraction=0.2)
    assert len(held.y) + len(held.y_valid) == len(full.y) and abs(len(held.y_valid) - 0.2 * len(full.y)) <= 10
    assert torch.isfinite(held.valid_loss(held.init(0)))
    with pytest.raises(ValueError, match="no validation split"):
        full.valid_loss(full.init(0))
    lo = PerParamMLP(hidden=4)
    meta = lo.init_meta()
    pes = PES(held, lo, particles=2, truncation=2, horizon=4, objective="valid")
    gen = torch.Generator().manual_seed(0)
    _, _, info = pes.grad(meta, pes.init(meta, gen), gen)
    assert info["meta_loss"] > 0
    with pytest.raises(ValueError, match="objective"):
        PES(held, lo, particles=2, truncation=2, horizon=4, objective="test")


def _fashion_files(root):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))


@pytest.mark.parametrize("name", ["digits", "fashion_mnist", "char_lm", "quadratic"])
def test_valid_objective_on_every_built_in_task(tmp_path, name):
    from gradmeta.data import stdlib_docstring_corpus
    from gradmeta.lopt import PES

    if name == "fashion_mnist":
        _fashion_files(tmp_path)
    if name == "char_lm":  # the small corpus of the test above
        corpus = stdlib_docstring_corpus(["json", "textwrap", "string"], val_fraction=0.3)
        task, full = char_lm(corpus, valid_fraction=0.2), char_lm(corpus)
        assert len(task._windows) < len(full._windows) and task.X_valid.shape[1:] == (8,)
    else:
        task = make_task(name, hidden=[4], batch_size=8, data_root=str(tmp_path), valid_fraction=0.25)
        if name != "quadratic":
            full = make_task(name, hidden=[4], batch_size=8, data_root=str(tmp_path))
            assert len(task.y) + len(task.y_valid) == len(full.y)  # held out of the training split
    assert torch.isfinite(task.valid_loss(task.init(0)))
    lo = PerParamMLP(hidden=4)
    meta = lo.init_meta()
    pes = PES(task, lo, particles=2, truncation=1, horizon=2, objective="valid")
    gen = torch.Generator().manual_seed(0)
    _, _, info = pes.grad(meta, pes.init(meta, gen), gen)
    assert info["meta_loss"] == info["meta_loss"] and info["meta_loss"] > 0
