"""Probes: the command line answers a user mistake with one line on stderr and exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradmeta import cli

from .conftest import (gm, malicious_pickle, malicious_torch_file, one_line_error, truncated_torch_file,
                       write_spec)

REFUSAL = "is not a gradmeta {} or contains code; refusing to load"


def _run_folder(tmp_path, metrics_text: str) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(metrics_text)
    return out


@pytest.mark.parametrize("text,why", [("{not json", "is not valid JSON"), ("[1, 2]", "top level is not an object"),
                                      ('{"history": {"train": 3}}', "'history' is not an object of"),
                                      ('{"plots": [3]}', "'plots' is not a list of file names"),
                                      ("\xff\xfe garbage", "is not valid JSON")])
def test_report_on_corrupt_metrics(tmp_path, capsys, text, why):
    out = _run_folder(tmp_path, "")
    (out / "metrics.json").write_bytes(text.encode("latin1"))
    assert gm("report", out) == 2
    one_line_error(capsys, str(out / "metrics.json"), why)


def test_report_on_missing_folder(tmp_path, capsys):
    assert gm("report", tmp_path / "nope") == 2
    one_line_error(capsys, "metrics.json does not exist")


def test_report_into_closed_pipe_is_quiet(tmp_path):
    """`gradmeta report DIR | head`: the reader is gone before the report is written."""
    history = {"train": {"step": list(range(50)), **{f"s{i}": [0.5] * 50 for i in range(200)}}}
    out = _run_folder(tmp_path, json.dumps({"task": "t", "status": "complete", "step": 1, "total_steps": 1,
                                            "summary": {}, "history": history, "plots": []}))
    r, w = os.pipe()
    os.close(r)  # like `head` exiting
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.run([sys.executable, "-m", "gradmeta", "report", str(out)], stdout=w, stderr=subprocess.PIPE,
                       env=env, timeout=120)
    os.close(w)
    assert p.returncode == 141, p.stderr.decode()
    assert p.stderr == b""


def test_resume_from_checkpoint_of_wrong_layout(tiny_spec, tmp_path, capsys):
    out = tmp_path / "r"
    assert gm("run", tiny_spec, "--out", out, "--max-steps", "3", "--no-progress") == 0
    capsys.readouterr()
    torch.save({"weights": torch.zeros(3)}, out / "checkpoint.pt")  # no step / state
    assert gm("run", tiny_spec, "--out", out, "--resume", "--no-progress") == 2
    one_line_error(capsys, str(out / "checkpoint.pt"), "is not a gradmeta run checkpoint")
    torch.save({"step": 3, "state": {"model": {}}}, out / "checkpoint.pt")  # another task's state
    assert gm("run", tiny_spec, "--out", out, "--resume", "--no-progress") == 2
    one_line_error(capsys, str(out / "checkpoint.pt"), "does not fit task 'gradients_digits'", "'optimizer'")
    ckpt = torch.load(out.parent / "r" / "checkpoint.pt", weights_only=True)
    torch.save({"step": 3, "state": {"model": {"w": torch.zeros(2)}, "optimizer": {}, "generator": torch.zeros(3),
                                     "history": {}}}, out / "checkpoint.pt")  # right keys, wrong tensors
    assert gm("run", tiny_spec, "--out", out, "--resume", "--no-progress") == 2
    one_line_error(capsys, "does not fit task 'gradients_digits'", "--overwrite")
    assert ckpt["step"] == 3


def test_resume_with_changed_spec_is_one_line(tiny_spec, tmp_path, capsys):
    out = tmp_path / "r"
    assert gm("run", tiny_spec, "--out", out, "--max-steps", "3", "--no-progress") == 0
    capsys.readouterr()
    assert gm("run", tiny_spec, "--out", out, "--resume", "--set", "train.lr=0.02", "--set", "seed=4") == 2
    one_line_error(capsys, "cannot resume", "seed: 1 -> 4; train.lr: 0.01 -> 0.02", "--overwrite")


def test_resume_from_malicious_checkpoint(tiny_spec, tmp_path, capsys):
    out = tmp_path / "r"
    assert gm("run", tiny_spec, "--out", out, "--max-steps", "3", "--no-progress") == 0
    capsys.readouterr()
    marker = tmp_path / "pwned"
    malicious_torch_file(out / "checkpoint.pt", marker)
    assert gm("run", tiny_spec, "--out", out, "--resume", "--no-progress") == 2
    one_line_error(capsys, f"{out / 'checkpoint.pt'} {REFUSAL.format('run checkpoint')}", "(it references exec)")
    assert not marker.exists()


def _curvature(tmp_path, *args) -> int:
    return gm("curvature", "--model", "torch.nn:Identity", "--out", tmp_path / "c", *args)


def test_curvature_malicious_checkpoint(tmp_path, capsys):
    marker = tmp_path / "pwned"
    for make in (malicious_pickle, malicious_torch_file):
        path = make(tmp_path / "ckpt.pt", marker)
        assert _curvature(tmp_path, "--data", "digits", "--checkpoint", path) == 2
        one_line_error(capsys, f"{path} {REFUSAL.format('checkpoint')}")
    assert not marker.exists()


def test_curvature_truncated_checkpoint(tmp_path, capsys):
    path = truncated_torch_file(tmp_path / "ckpt.pt")
    assert _curvature(tmp_path, "--data", "digits", "--checkpoint", path) == 2
    one_line_error(capsys, f"{path} {REFUSAL.format('checkpoint')}", "truncated or corrupted")


def test_curvature_malicious_data_file(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = malicious_torch_file(tmp_path / "data.pt", marker)
    assert _curvature(tmp_path, "--data", path) == 2
    one_line_error(capsys, f"{path} {REFUSAL.format('data file')}")
    assert not marker.exists()


def test_curvature_npz_with_object_arrays(tmp_path, capsys):
    path = tmp_path / "data.npz"
    np.savez(path, X=np.array([object(), 1], dtype=object), y=np.arange(2))
    assert _curvature(tmp_path, "--data", path) == 2
    one_line_error(capsys, f"--data {path}: not a readable .npz of plain arrays")


def test_curvature_npz_that_is_a_pickle(tmp_path, capsys):
    path = malicious_pickle(tmp_path / "data.npz", tmp_path / "pwned")
    assert _curvature(tmp_path, "--data", path) == 2
    one_line_error(capsys, f"--data {path}")
    assert not (tmp_path / "pwned").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "report", str(tmp_path / "nope")])


def test_permission_error_is_one_line(tmp_path, capsys, monkeypatch):
    def denied(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "metrics.json"))

    monkeypatch.setattr(cli, "_cmd_report", denied)
    assert gm("report", tmp_path) == 2
    one_line_error(capsys, "Permission denied", "metrics.json")


def test_bug_is_not_hidden(monkeypatch):
    """Only user mistakes become one line; an internal error keeps its traceback."""
    def bug(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "_cmd_report", bug)
    with pytest.raises(KeyError):
        gm("report", ".")


@pytest.mark.parametrize("args,message", [
    (["curvature", "--model", "torch.nn:Identity", "--data", "digits", "--batch-size", "0"],
     "argument --batch-size: must be positive, got 0"),
    (["inr", "build-zoo", "--out", "z", "--steps", "-5"], "argument --steps: must be positive, got -5"),
])
def test_non_positive_counts_on_the_command_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gm(*args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_curvature_data_with_mismatched_lengths(tmp_path, capsys):
    torch.save({"X": torch.randn(5, 64), "y": torch.zeros(4, dtype=torch.long)}, tmp_path / "d.pt")
    assert _curvature(tmp_path, "--data", tmp_path / "d.pt") == 2
    one_line_error(capsys, "same N >= 1", "(5, 64) and (4,)")


def test_curvature_model_without_parameters(tmp_path, capsys):
    assert _curvature(tmp_path, "--data", "digits") == 2
    one_line_error(capsys, "torch.nn:Identity: the model has no parameters")
