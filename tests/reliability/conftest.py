"""Shared helpers of the reliability probes: a tiny spec, one-line error checks, hostile files."""
from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradmeta import cli
from tests.conftest import write_spec as _write_spec

#: A gradients_digits spec that runs 6 steps in well under a second.
TINY = """\
task = "gradients_digits"
seed = 1

[model]
widths = [64, 8, 10]

[train]
steps = 6
batch_size = 16
lr = 0.01
eval_every = 3
checkpoint_every = 3

[collect]
every = 3
batch_size = 16
"""


def write_spec(folder: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    return _write_spec(folder, text, name)


def gm(*args) -> int:
    """``gradmeta ARGS`` in this process; returns the exit status."""
    return cli.main([str(a) for a in args])


def one_line_error(capsys, *fragments: str) -> str:
    """The captured stderr: exactly one line ``gradmeta ...: error: ...`` holding every fragment."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gradmeta ") and ": error: " in lines[0], err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


class CodePayload:
    """Pickles to ``exec(...)`` creating ``marker``: loading it must never run that code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def malicious_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": CodePayload(marker)}, protocol=2))
    return path


def malicious_torch_file(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"step": 1, "state": {"model": CodePayload(marker)}}, path)
    return path


def truncated_torch_file(path: Path) -> Path:
    import torch

    torch.save({"weight": torch.zeros(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def python_subprocess(code: str, **kw) -> subprocess.Popen:
    """A second Python process running ``code`` with this checkout first on the path."""
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, **kw)


@pytest.fixture
def tiny_spec(tmp_path) -> Path:
    return write_spec(tmp_path)
