"""A character-level text corpus built at run time from the Python standard library's docstrings.

The docstrings are read from the standard library's source files with ``ast`` (nothing is
imported, so no module side effects run). The corpus therefore depends on the Python version
that builds it; ``TextCorpus.fingerprint`` identifies the exact text.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ._errors import MissingDataError
from ._tensors import lm_batches

__all__ = ["CharTokenizer", "TextCorpus", "stdlib_docstring_corpus", "DEFAULT_MODULES"]

# Pure-Python modules and packages present in every CPython >= 3.10; a package means all its
# .py files. About 0.5 MB of docstrings; ~1 s to parse.
DEFAULT_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fnmatch", "fractions",
    "functools", "gettext", "glob", "heapq", "http", "inspect", "ipaddress", "json", "logging",
    "pathlib", "pprint", "queue", "random", "shutil", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "typing", "urllib", "zipfile",
)

_SEPARATOR = "\n\n"


class CharTokenizer:
    """Maps characters to integer ids ``0 .. vocab_size - 1`` and back.

    Args:
        chars: the vocabulary; id ``i`` is ``chars[i]``. Must not repeat a character.
        unk: optional character (in ``chars``) that stands for any character outside the
            vocabulary; without it, encoding an unknown character raises ``ValueError``.
    """

    def __init__(self, chars: str, unk: str | None = None):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: chars contains repeated characters")
        if unk is not None and unk not in chars:
            raise ValueError(f"CharTokenizer: unk {unk!r} is not in the vocabulary")
        self.chars = chars
        self.unk = unk
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str, unk: str | None = None) -> CharTokenizer:
        """Vocabulary = the distinct characters of ``text`` (plus ``unk``), sorted by code point."""
        return cls("".join(sorted(set(text) | ({unk} if unk else set()))), unk=unk)

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """``text`` as int64 ids, shape ``(len(text),)``."""
        index, unk = self._index, self.unk
        try:
            ids = [index[c] for c in text]
        except KeyError as e:
            if unk is None:
                raise ValueError(f"CharTokenizer.encode: character {e.args[0]!r} is not in the vocabulary") from None
            ids = [index.get(c, index[unk]) for c in text]
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids: Tensor | Iterable[int]) -> str:
        """Inverse of :meth:`encode` for a 1-D tensor or sequence of ids."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"CharTokenizer.decode: expected a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        try:
            return "".join(self.chars[i] for i in ids)
        except IndexError:
            raise ValueError(f"CharTokenizer.decode: ids must lie in 0..{self.vocab_size - 1}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and (self.chars, self.unk) == (other.chars, other.unk)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk={self.unk!r})"


@dataclass(frozen=True, eq=False)
class TextCorpus:
    """A tokenized corpus with a train and a validation stream.

    Attributes:
        train: int64 ids ``(N_train,)``; documents joined by a blank line.
        val: int64 ids ``(N_val,)``.
        tokenizer: the :class:`CharTokenizer` for both streams.
        fingerprint: sha256 of the train and validation text; equal fingerprints mean equal data.
        sources: the modules the text was read from, in order.
    """

    train: Tensor
    val: Tensor
    tokenizer: CharTokenizer
    fingerprint: str
    sources: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return self.tokenizer.vocab_size

    def split(self, name: str) -> Tensor:
        """The token stream ``"train"`` or ``"val"``."""
        if name not in ("train", "val"):
            raise ValueError(f"TextCorpus: split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def get_batch(
        self, split: str, batch_size: int, seq_len: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Random windows for next-character prediction (:func:`lm_batches` on one stream).

        Returns:
            ``(inputs, targets)``, both int64 ``(batch_size, seq_len)``, with
            ``targets[:, t] == inputs[:, t + 1]`` inside a window (targets are shifted by one).
        """
        tokens = self.split(split)
        if seq_len < 1 or tokens.numel() - seq_len < 1:
            raise ValueError(f"TextCorpus.get_batch: seq_len={seq_len} does not fit the {split} stream of {tokens.numel()} tokens")
        return lm_batches(tokens, batch_size, seq_len, generator)

    def windows(self, split: str, seq_len: int, max_windows: int | None = None) -> tuple[Tensor, Tensor]:
        """Consecutive non-overlapping windows from the start of a stream (for evaluation).

        Returns:
            ``(inputs, targets)``, both int64 ``(W, seq_len)``; ``W`` is every full window,
            capped at ``max_windows``.
        """
        tokens = self.split(split)
        w = (tokens.numel() - 1) // seq_len if seq_len >= 1 else 0
        if w < 1:
            raise ValueError(f"TextCorpus.windows: seq_len={seq_len} does not fit the {split} stream of {tokens.numel()} tokens")
        if max_windows is not None:
            w = min(w, max_windows)
        x = tokens[: w * seq_len].view(w, seq_len)
        y = tokens[1 : w * seq_len + 1].view(w, seq_len)
        return x, y

    def __repr__(self) -> str:
        return (
            f"TextCorpus(train={self.train.numel()}, val={self.val.numel()}, vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint[:12]}…)"
        )


def _module_files(stdlib: Path, module: str) -> list[tuple[str, Path]]:
    rel = Path(*module.split("."))
    if (stdlib / rel).with_suffix(".py").is_file():
        return [(module, (stdlib / rel).with_suffix(".py"))]
    if (stdlib / rel).is_dir():
        files = sorted(p for p in (stdlib / rel).rglob("*.py") if not any(part.startswith("test") for part in p.parts[len(stdlib.parts):]))
        names = [p.relative_to(stdlib).with_suffix("").parts for p in files]
        return [(".".join(n[:-1] if n[-1] == "__init__" else n), p) for n, p in zip(names, files)]
    return []


def _docstrings(tree: ast.AST, prefix: str) -> Iterable[tuple[str, str]]:
    """``(qualified name, cleaned docstring)`` in source order (depth first)."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc and doc.strip():
            yield prefix, doc.strip()
    for child in ast.iter_child_nodes(tree):
        # Docstrings live only in statement bodies; skipping expressions keeps the recursion shallow.
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, f"{prefix}.{child.name}")
        elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            yield from _docstrings(child, prefix)


@functools.lru_cache(maxsize=4)
def _collect(modules: tuple[str, ...], stdlib: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    docs: list[tuple[str, str]] = []
    sources: list[str] = []
    for module in modules:
        for name, path in _module_files(Path(stdlib), module):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue  # e.g. a lib2to3 fixture; the fingerprint records what was used
            sources.append(name)
            docs.extend(_docstrings(tree, name))
    return tuple(docs), tuple(sources)


def _in_val(key: str, seed: int, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")
    return h < val_fraction * 2**64


def stdlib_docstring_corpus(
    modules: Sequence[str] | None = None, *, val_fraction: float = 0.1, seed: int = 0, stdlib_dir: str | None = None
) -> TextCorpus:
    """Character-level corpus of the docstrings of standard-library modules.

    Each docstring (module, class, function) is one document. A document goes to validation
    when a hash of ``(seed, its qualified name and occurrence)`` falls below ``val_fraction``, so
    the split is deterministic, independent of random-number streams, and a document keeps its
    side when other modules are added. Documents are joined by a blank line in source order.

    Args:
        modules: module or package names (a package means all its non-test ``.py`` files);
            default :data:`DEFAULT_MODULES`. Names without a source file are skipped and left
            out of ``sources``.
        val_fraction: expected share of documents in validation, in ``(0, 1)``.
        seed: chooses the split.
        stdlib_dir: where the standard library's sources live (default: this interpreter's).

    Returns:
        :class:`TextCorpus` whose tokenizer's vocabulary is every character of the corpus.

    Raises:
        MissingDataError: none of the modules has a source file (e.g. a Python without ``.py`` sources).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"stdlib_docstring_corpus: val_fraction must be in (0, 1), got {val_fraction}")
    modules = tuple(DEFAULT_MODULES if modules is None else modules)
    stdlib = stdlib_dir or sysconfig.get_paths()["stdlib"]
    docs, sources = _collect(modules, str(stdlib))
    if not docs:
        raise MissingDataError(f"stdlib_docstring_corpus: no source files with docstrings for {list(modules)} under {stdlib}")
    parts: dict[bool, list[str]] = {False: [], True: []}
    seen: dict[str, int] = {}
    for key, doc in docs:
        seen[key] = seen.get(key, -1) + 1  # overloads and redefinitions share a name
        parts[_in_val(f"{key}#{seen[key]}", seed, val_fraction)].append(doc)
    if not parts[False] or not parts[True]:
        raise ValueError(f"stdlib_docstring_corpus: {len(docs)} documents leave one split empty at val_fraction={val_fraction}")
    train_text, val_text = _SEPARATOR.join(parts[False]), _SEPARATOR.join(parts[True])
    tokenizer = CharTokenizer.from_text(train_text + val_text)
    fingerprint = hashlib.sha256(f"{train_text}\x00{val_text}".encode()).hexdigest()
    return TextCorpus(tokenizer.encode(train_text), tokenizer.encode(val_text), tokenizer, fingerprint, sources)
