"""Character tokenizer and the stdlib-docstring corpus (on a fake stdlib, and on the real one)."""
from __future__ import annotations

import textwrap

import pytest
import torch

from gradmeta import data as gd


def test_tokenizer_round_trip_and_errors():
    tok = gd.CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw" and tok.vocab_size == 8
    ids = tok.encode("hello")
    assert ids.dtype == torch.int64 and ids.tolist() == [3, 2, 4, 4, 5]
    assert tok.decode(ids) == "hello" and tok.decode([7, 5]) == "wo"
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        tok.encode("zoo")
    with pytest.raises(ValueError, match=r"0\.\.7"):
        tok.decode([8])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))
    unk = gd.CharTokenizer.from_text("ab", unk="?")
    assert unk.decode(unk.encode("abz")) == "ab?"
    assert unk == gd.CharTokenizer("?ab", unk="?") and unk != tok
    with pytest.raises(ValueError, match="repeated"):
        gd.CharTokenizer("aa")


@pytest.fixture
def fake_stdlib(tmp_path):
    (tmp_path / "alpha.py").write_text(textwrap.dedent('''\
        """Alpha module."""
        raise SystemExit("importing would run this")

        def f():
            """Eff."""
            def inner():
                """Inner doc."""

        class K:
            """Kay."""
            async def m(self):
                """Em."""
            def undocumented(self):
                return 1
        '''))
    pkg = tmp_path / "pkg"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Package doc."""\n')
    (pkg / "sub.py").write_text('"""Sub doc."""\nif True:\n    def g():\n        """Gee."""\n')
    (pkg / "tests" / "test_x.py").write_text('"""Should be skipped."""\n')
    (tmp_path / "broken.py").write_text('"""Never read."""\ndef (:\n')
    for i in range(40):
        (tmp_path / f"many{i:02d}.py").write_text(f'"""Doc number {i}."""\n')
    return tmp_path


def _docs(corpus, split):
    return corpus.tokenizer.decode(corpus.split(split)).split("\n\n")


def test_corpus_reads_docstrings_without_importing(fake_stdlib):
    c = gd.stdlib_docstring_corpus(["alpha", "pkg", "broken", "missing"], val_fraction=0.5, stdlib_dir=str(fake_stdlib))
    assert c.sources == ("alpha", "pkg", "pkg.sub")
    docs = _docs(c, "train") + _docs(c, "val")
    assert sorted(docs) == sorted(["Alpha module.", "Eff.", "Inner doc.", "Kay.", "Em.", "Package doc.", "Sub doc.", "Gee."])
    assert c.vocab_size == len(set("".join(docs) + "\n"))


def test_corpus_split_is_deterministic_and_stable(fake_stdlib):
    mods = [f"many{i:02d}" for i in range(40)]
    kw = dict(val_fraction=0.25, stdlib_dir=str(fake_stdlib))
    a = gd.stdlib_docstring_corpus(mods, **kw)
    gd._text._collect.cache_clear()  # rebuild from the files, not from the cache
    b = gd.stdlib_docstring_corpus(mods, **kw)
    assert a.fingerprint == b.fingerprint and torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    val = set(_docs(a, "val"))
    assert 0 < len(val) < 40 and val.isdisjoint(_docs(a, "train"))
    # A document keeps its side when other modules are added or removed.
    fewer = gd.stdlib_docstring_corpus(mods[:20], **kw)
    assert set(_docs(fewer, "val")) == {d for d in val if int(d.split()[-1][:-1]) < 20}
    other = gd.stdlib_docstring_corpus(mods, val_fraction=0.25, seed=1, stdlib_dir=str(fake_stdlib))
    assert other.fingerprint != a.fingerprint
    with pytest.raises(gd.MissingDataError, match="no source files"):
        gd.stdlib_docstring_corpus(["missing"], stdlib_dir=str(fake_stdlib))
    with pytest.raises(ValueError, match="val_fraction"):
        gd.stdlib_docstring_corpus(mods, val_fraction=1.0, stdlib_dir=str(fake_stdlib))


@pytest.fixture(scope="module")
def corpus():
    return gd.stdlib_docstring_corpus()


def test_real_stdlib_corpus(corpus):
    n_train, n_val = corpus.train.numel(), corpus.val.numel()
    assert n_train > 200_000 and 0.05 < n_val / (n_train + n_val) < 0.2
    assert "json" in corpus.sources and len(corpus.fingerprint) == 64
    assert corpus.train.dtype == torch.int64 and int(corpus.train.max()) < corpus.vocab_size
    text = corpus.tokenizer.decode(corpus.train) + corpus.tokenizer.decode(corpus.val)
    assert "JSON (JavaScript Object Notation)" in text
    assert corpus.tokenizer.encode(text[:1000]).tolist() == torch.cat([corpus.train, corpus.val])[:1000].tolist()


def test_lm_batches_and_windows(corpus):
    g = torch.Generator().manual_seed(0)
    x, y = corpus.get_batch("train", 8, 8, generator=g)
    assert x.shape == y.shape == (8, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = corpus.get_batch("train", 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    # every row is a contiguous piece of the stream
    stream = corpus.tokenizer.decode(corpus.train)
    assert all(corpus.tokenizer.decode(torch.cat([r[:1], s])) in stream for r, s in zip(x, y))
    wx, wy = corpus.windows("val", 16, max_windows=5)
    assert wx.shape == (5, 16) and torch.equal(wx.flatten(), corpus.val[:80]) and torch.equal(wy.flatten(), corpus.val[1:81])
    assert corpus.windows("val", 16)[0].shape[0] == (corpus.val.numel() - 1) // 16
    with pytest.raises(ValueError, match="seq_len"):
        corpus.get_batch("val", 2, corpus.val.numel())
    with pytest.raises(ValueError, match="split"):
        corpus.get_batch("test", 2, 4)
