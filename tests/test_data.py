"""gradmeta.data: downsample_flatten, lm_batches and load_cifar against slow references, plus
file-format cases not covered in tests/data/ (mixed plain/gzip IDX pairs, truncated files seen
through the loaders, Python 3 protocol-2 CIFAR pickles, other forbidden pickle globals).

The writers here are separate from tests/data/conftest.py: IDX headers are built with numpy's
big-endian uint32, CIFAR batches with the standard ``pickle`` module.
"""
from __future__ import annotations

import gzip
import inspect
import json
import math
import pickle
import textwrap

import numpy as np
import pytest
import torch

from gradmeta import data as gd


# ---------------------------------------------------------------- downsample_flatten

def _adaptive_mean_reference(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Area averaging by an explicit loop: out[i, j] = mean of rows floor(iH/h)..ceil((i+1)H/h)-1 (same for columns)."""
    n, c, H, W = x.shape
    out = torch.empty(n, c, h, w, dtype=x.dtype)
    for i in range(h):
        r0, r1 = (i * H) // h, math.ceil((i + 1) * H / h)
        for j in range(w):
            c0, c1 = (j * W) // w, math.ceil((j + 1) * W / w)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


@pytest.mark.parametrize("shape,size", [((3, 1, 28, 28), 8), ((2, 3, 32, 32), 8), ((2, 3, 32, 32), (4, 2)), ((2, 1, 28, 28), 7)])
def test_downsample_flatten_equals_loop_reference(shape, size):
    x = torch.rand(*shape, dtype=torch.float64)
    h, w = (size, size) if isinstance(size, int) else size
    got = gd.downsample_flatten(x, size)
    assert got.shape == (shape[0], shape[1] * h * w) and got.dtype == torch.float64
    torch.testing.assert_close(got, _adaptive_mean_reference(x, h, w).reshape(shape[0], -1), atol=1e-12, rtol=0)


def test_downsample_flatten_exact_blocks_uint8_and_imagedata():
    x = torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8)  # (N, H, W): one channel
    got = gd.downsample_flatten(x)
    want = (x.double() / 255).reshape(4, 8, 4, 8, 4).mean(dim=(2, 4)).reshape(4, 64)
    assert got.dtype == torch.float32 and got.shape == (4, 64)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    d = gd.ImageData(torch.rand(5, 3, 28, 28), torch.zeros(5, dtype=torch.long), ("a",), "toy")
    assert torch.equal(gd.downsample_flatten(d), d.resize(8).flat())  # same operation as ImageData.resize
    same = torch.rand(2, 1, 8, 8)
    assert torch.equal(gd.downsample_flatten(same), same.reshape(2, 64))  # already 8×8: just flattened
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, C, H, W\).*\(64,\)"):
        gd.downsample_flatten(torch.rand(64))
    with pytest.raises(ValueError, match="int32"):
        gd.downsample_flatten(torch.zeros(2, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="size"):
        gd.downsample_flatten(same, 0)


def test_digits_flattened_inputs():
    train, test = gd.load_digits("train"), gd.load_digits("test")
    x, y = train.tensors(flatten=True)
    assert x.shape == (1438, 64) and y.dtype == torch.int64 and len(test) == 359
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(gd.downsample_flatten(train), x)  # digits are already 8×8


# ---------------------------------------------------------------- lm_batches

def test_lm_batches_equals_slicing_reference():
    tokens = torch.arange(100, 150, dtype=torch.int32)  # distinct values make windows identifiable
    x, y = gd.lm_batches(tokens, 6, 5, torch.Generator().manual_seed(3))
    starts = torch.randint(0, 50 - 5, (6,), generator=torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (6, 5) and x.dtype == y.dtype == torch.int64
    for b, s in enumerate(starts.tolist()):
        assert x[b].tolist() == tokens[s:s + 5].tolist() and y[b].tolist() == tokens[s + 1:s + 6].tolist()
    assert torch.equal(x[:, 1:], y[:, :-1])
    # The shortest stream that fits: every window is the whole stream.
    x, y = gd.lm_batches(torch.tensor([7, 8, 9]), 4, 2)
    assert x.tolist() == [[7, 8]] * 4 and y.tolist() == [[8, 9]] * 4


def test_lm_batches_errors():
    with pytest.raises(ValueError, match="needs at least 4 tokens, the stream has 3"):
        gd.lm_batches(torch.arange(3), 1, 3)
    with pytest.raises(ValueError, match=r"1-D integer.*\(2, 3\)"):
        gd.lm_batches(torch.zeros(2, 3, dtype=torch.long), 1, 1)
    with pytest.raises(ValueError, match="1-D integer"):
        gd.lm_batches(torch.zeros(10), 1, 1)
    with pytest.raises(ValueError, match="batch_size and seq_len"):
        gd.lm_batches(torch.arange(10), 0, 2)


@pytest.fixture(scope="module")
def small_corpus():
    return gd.stdlib_docstring_corpus(["json", "textwrap"], val_fraction=0.2)


def test_small_corpus_is_deterministic_and_round_trips(small_corpus):
    gd._text._collect.cache_clear()  # rebuild from the source files
    again = gd.stdlib_docstring_corpus(["json", "textwrap"], val_fraction=0.2)
    assert again.fingerprint == small_corpus.fingerprint and torch.equal(again.train, small_corpus.train)
    assert small_corpus.sources[0].startswith("json") and small_corpus.sources[-1] == "textwrap"
    tok = small_corpus.tokenizer
    train_text, val_text = tok.decode(small_corpus.train), tok.decode(small_corpus.val)
    assert torch.equal(tok.encode(train_text), small_corpus.train)
    # Each docstring (seen here through import, independently of the ast reader) is in exactly one split.
    for obj in (json, json.dumps, json.loads, json.JSONDecoder.decode, textwrap.dedent, textwrap.TextWrapper):
        doc = inspect.cleandoc(obj.__doc__).strip()
        assert (doc in train_text) != (doc in val_text), obj.__qualname__ if hasattr(obj, "__qualname__") else obj
    assert val_text and train_text
    assert tok.chars == "".join(sorted(set(train_text + val_text)))
    # get_batch is lm_batches on one stream, draw for draw.
    a = small_corpus.get_batch("val", 4, 8, generator=torch.Generator().manual_seed(5))
    b = gd.lm_batches(small_corpus.val, 4, 8, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- IDX through the loaders

def _idx_bytes(a: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D}[a.dtype]
    return bytes([0, 0, code, a.ndim]) + np.array(a.shape, dtype=">u4").tobytes() + a.astype(a.dtype.newbyteorder(">")).tobytes()


def test_mnist_mixed_plain_and_gzip_and_truncated(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 4], dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    d = gd.load_fashion_mnist(tmp_path, "test")
    assert torch.equal((d.images[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images))
    assert d.labels.tolist() == [9, 0, 4]
    assert gd.downsample_flatten(d.images).shape == (3, 64)
    # A truncated images file: the error names it and gives both sizes.
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)[:-28]))
    with pytest.raises(gd.DataFormatError, match=r"t10k-images-idx3-ubyte\.gz: header shape \(3, 28, 28\).*2352 data bytes, found 2324"):
        gd.load_fashion_mnist(tmp_path, "test")
    # A gzip stream cut short is reported as such, naming the file.
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images))[:40])
    with pytest.raises(gd.DataFormatError, match=r"t10k-images-idx3-ubyte\.gz: cannot decompress"):
        gd.load_fashion_mnist(tmp_path, "test")


# ---------------------------------------------------------------- CIFAR via load_cifar

def _batch(rng, n, **label_keys):
    d = {b"batch_label": b"tiny", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    d.update({k.encode(): [int(v) for v in rng.integers(0, c, n)] for k, c in label_keys.items()})
    return d


def test_load_cifar_dispatch_protocol2_pickles(tmp_path):
    rng = np.random.default_rng(0)
    c10, c100 = tmp_path / "cifar-10-batches-py", tmp_path / "cifar-100-python"
    c10.mkdir(), c100.mkdir()
    b10 = {name: _batch(rng, 2, labels=10) for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    for name, b in b10.items():
        (c10 / name).write_bytes(pickle.dumps(b, protocol=2))  # Python 3, protocol 2: bytes via _codecs.encode
    b100 = _batch(rng, 3, fine_labels=100, coarse_labels=20)
    (c100 / "test").write_bytes(pickle.dumps(b100, protocol=2))

    d = gd.load_cifar(tmp_path, "test")
    assert d.images.shape == (2, 3, 32, 32) and d.labels.tolist() == b10["test_batch"][b"labels"]
    raw = (d.images * 255).round().to(torch.uint8).reshape(2, -1).numpy()
    np.testing.assert_array_equal(raw, b10["test_batch"][b"data"])
    assert len(gd.load_cifar(tmp_path, "train", num_classes=10)) == 10
    fine, coarse = gd.load_cifar(tmp_path, "test", num_classes=100), gd.load_cifar(tmp_path, "test", num_classes=20)
    assert fine.labels.tolist() == b100[b"fine_labels"] and fine.num_classes == 100
    assert coarse.labels.tolist() == b100[b"coarse_labels"] and coarse.num_classes == 20
    assert gd.downsample_flatten(fine).shape == (3, 3 * 64)
    with pytest.raises(ValueError, match="num_classes must be 10, 100 or 20"):
        gd.load_cifar(tmp_path, "test", num_classes=50)


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("case", ["truncated", "eval", "empty"])
def test_cifar_bad_pickles_name_the_file(tmp_path, case):
    good = pickle.dumps(_batch(np.random.default_rng(0), 2, labels=10), protocol=2)
    raw = {"truncated": good[: len(good) // 2],
           "eval": pickle.dumps({b"data": _CallsEval(), b"labels": [0]}, protocol=2),
           "empty": b""}[case]
    (tmp_path / "test_batch").write_bytes(raw)
    msg = r"test_batch: refusing to unpickle (__builtin__|builtins)\.eval" if case == "eval" else r"test_batch: not a readable CIFAR pickle"
    with pytest.raises(gd.DataFormatError, match=msg):
        gd.load_cifar(tmp_path, "test")
