"""ImageData, the deterministic split and the embedded digits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradmeta import data as gd


@pytest.fixture(scope="module")
def digits_all():
    return gd.load_digits("all")


def test_digits_all_equals_sklearn_scaled(digits_all):
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert digits_all.images.shape == (1797, 1, 8, 8) and digits_all.images.dtype == torch.float32
    np.testing.assert_array_equal(digits_all.images[:, 0].numpy(), (raw.images / 16.0).astype(np.float32))
    np.testing.assert_array_equal(digits_all.labels.numpy(), raw.target)
    assert digits_all.classes == tuple("0123456789") and digits_all.num_classes == 10
    assert 0.0 <= float(digits_all.images.min()) and float(digits_all.images.max()) == 1.0


def test_digits_split_partitions_is_stratified_and_deterministic(digits_all):
    train, test = gd.load_digits("train"), gd.load_digits("test")
    assert (len(train), len(test)) == (1438, 359)
    # Recover which examples went where by matching rows of the full set.
    key = {tuple(x.flatten().tolist()) + (int(y),): i for i, (x, y) in enumerate(zip(digits_all.images, digits_all.labels))}
    tr = {key[tuple(x.flatten().tolist()) + (int(y),)] for x, y in zip(train.images, train.labels)}
    te = {key[tuple(x.flatten().tolist()) + (int(y),)] for x, y in zip(test.images, test.labels)}
    # (digits has a few duplicate images, so count distinct keys, not rows)
    assert not tr & te and len(tr | te) == len(key)
    counts = torch.bincount(digits_all.labels, minlength=10)
    torch.testing.assert_close(torch.bincount(test.labels, minlength=10), torch.round(0.2 * counts).long())
    again = gd.load_digits("test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert not torch.equal(gd.load_digits("test", seed=1).labels, test.labels)
    assert gd.load_digits("train", dtype=torch.float64).images.dtype == torch.float64


def test_stratified_split_reference():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 2, 2])
    tr, te = gd.stratified_split(labels, 0.5, seed=3)
    assert sorted(tr.tolist() + te.tolist()) == list(range(10))
    assert torch.bincount(labels[te], minlength=3).tolist() == [2, 2, 1]
    assert torch.equal(gd.stratified_split(labels, 0.5, seed=3)[1], te)
    assert gd.stratified_split(labels, 0.0)[1].numel() == 0 and gd.stratified_split(labels, 1.0)[0].numel() == 0
    with pytest.raises(ValueError, match="test_fraction"):
        gd.stratified_split(labels, 1.5)
    with pytest.raises(ValueError, match="split"):
        gd.load_digits("validation")


def _image_data(n=10, c=1, h=4, w=4):
    g = torch.Generator().manual_seed(0)
    return gd.ImageData(torch.rand(n, c, h, w, generator=g), torch.arange(n) % 3, ("a", "b", "c"), "toy")


def test_image_data_validates_with_named_errors():
    x = torch.rand(4, 1, 2, 2)
    with pytest.raises(ValueError, match=r"'bad'.*\(N, C, H, W\).*\(4, 4\)"):
        gd.ImageData(torch.rand(4, 4), torch.zeros(4, dtype=torch.long), ("a",), "bad")
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\).*\(3,\)"):
        gd.ImageData(x, torch.zeros(3, dtype=torch.long), ("a",), "bad")
    with pytest.raises(ValueError, match="int64"):
        gd.ImageData(x, torch.zeros(4, dtype=torch.int32), ("a",), "bad")
    with pytest.raises(ValueError, match="0..2 but there are 2 classes"):
        gd.ImageData(x, torch.tensor([0, 1, 2, 0]), ("a", "b"), "bad")


def test_resize_is_block_mean_and_views():
    d = _image_data(n=5, c=3, h=28, w=28)
    small = d.resize(7)
    want = d.images.reshape(5, 3, 7, 4, 7, 4).mean(dim=(3, 5))
    torch.testing.assert_close(small.images, want, atol=1e-6, rtol=0)
    assert d.resize(28) is d and small.image_shape == (3, 7, 7)
    assert d.resize((8, 8)).images.shape == (5, 3, 8, 8)  # uneven: adaptive windows
    assert d.grayscale().images.shape == (5, 1, 28, 28)
    torch.testing.assert_close(d.grayscale().images[:, 0], d.images.mean(1))
    assert d.flat().shape == (5, 3 * 28 * 28)
    x, y = d.tensors(flatten=True)
    assert x.shape == (5, 2352) and torch.equal(y, d.labels)
    assert d.to(torch.float64).images.dtype == torch.float64
    with pytest.raises(ValueError, match="size"):
        d.resize(0)


def test_batches_cover_every_example_once():
    d = _image_data(n=10)
    seen = []
    for x, y in d.batches(3, generator=torch.Generator().manual_seed(1)):
        assert x.shape[1:] == (1, 4, 4) and x.shape[0] == y.shape[0] <= 3
        seen += [int((d.images == xi).all(dim=(1, 2, 3)).nonzero()) for xi in x]
    assert sorted(seen) == list(range(10))
    order = [int(v) for _, y in d.batches(4, shuffle=False) for v in y]
    assert order == d.labels.tolist()
    assert [x.shape for x, _ in d.batches(4, drop_last=True, flatten=True)] == [(4, 16), (4, 16)]
    sub = d.subset([3, 1])
    assert torch.equal(sub.images, d.images[[3, 1]]) and len(sub) == 2
    loader = torch.utils.data.DataLoader(d, batch_size=4)
    xb, yb = next(iter(loader))
    assert torch.equal(xb, d.images[:4]) and torch.equal(yb, d.labels[:4])
