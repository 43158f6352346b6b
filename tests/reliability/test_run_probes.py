"""Probes: run folders are never clobbered, locked against a second process, crash-clean, and
record what really happened (timings over invocations, threads applied, divergence)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest
import torch

from .conftest import gm, one_line_error, python_subprocess, write_spec


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_out_path_through_absent_folder_does_not_clobber_a_finished_run(tiny_spec, tmp_path, capsys):
    old = tmp_path / "old_run"
    old.mkdir()
    files = {"metrics.json": '{"status": "complete"}\n', "spec.resolved.toml": "task = 'x'\n", "checkpoint.pt": "c"}
    for name, text in files.items():
        (old / name).write_text(text)
    assert gm("run", tiny_spec, "--out", f"{tmp_path}/absent/../old_run", "--no-progress") == 2
    one_line_error(capsys, str(old), "already holds a run")
    assert {n: (old / n).read_text() for n in files} == files


def test_second_process_is_refused_while_the_first_holds_the_folder(tiny_spec, tmp_path, capsys):
    out = tmp_path / "r"
    first = python_subprocess(f"""
        import sys
        import gradmeta.experiments  # registers the tasks
        from gradmeta.run import Run
        from gradmeta.specs import load_spec, resolve_spec
        run = Run({str(out)!r}, resolve_spec(load_spec({str(tiny_spec)!r})), spec_path={str(tiny_spec)!r})
        print("holding", flush=True)
        sys.stdin.readline()
        run.close()
    """, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        other = write_spec(tmp_path, "task = 'gradients_digits'\n[train]\nsteps = 2\n", name="other.toml")
        for args in ((other, "--out", out), (tiny_spec, "--out", out, "--resume"), (other, "--out", out, "--overwrite")):
            assert gm("run", *args, "--no-progress") == 2
            one_line_error(capsys, f"in use by another gradmeta run (pid {first.pid} on {socket.gethostname()}")
        assert sorted(os.listdir(out)) == [".lock", "spec.resolved.toml"]
    finally:
        first.kill()  # SIGKILL: the lock stays behind with a dead pid
        first.wait()
    assert (out / ".lock").exists()
    assert gm("run", tiny_spec, "--out", out, "--resume", "--no-progress") == 0
    assert _metrics(out)["status"] == "complete" and not (out / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_replaced_and_reported(tiny_spec, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    dead = _dead_pid()
    (out / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    assert gm("run", tiny_spec, "--out", out, "--no-progress") == 0
    assert f"was locked by pid {dead} (started x), which is no longer running" in capsys.readouterr().err
    assert not (out / ".lock").exists()


def test_sigkill_during_checkpoint_write_leaves_no_temp_after_resume(tiny_spec, tmp_path):
    out = tmp_path / "r"
    assert gm("run", tiny_spec, "--out", out, "--max-steps", "3", "--no-progress") == 0
    before = (out / "checkpoint.pt").read_bytes()
    victim = python_subprocess(f"""
        import os, signal, torch
        from gradmeta._io import atomic_write
        def write(f):
            torch.save({{"step": 6, "state": {{"x": torch.zeros(10000)}}}}, f)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # mid-write: the temporary is on disk, not yet renamed
        atomic_write({str(out / 'checkpoint.pt')!r}, write)
    """)
    assert victim.wait() == -signal.SIGKILL
    temps = [n for n in os.listdir(out) if n.startswith(".checkpoint.pt.tmp-")]
    assert temps == [f".checkpoint.pt.tmp-{victim.pid}"]
    assert (out / "checkpoint.pt").read_bytes() == before  # the old checkpoint is intact
    assert gm("run", tiny_spec, "--out", out, "--resume", "--no-progress") == 0
    assert [n for n in os.listdir(out) if ".tmp-" in n] == []
    assert _metrics(out)["step"] == 6


def test_resume_after_final_checkpoint_reports_summed_timing(tiny_spec, tmp_path):
    out = tmp_path / "r"
    assert gm("run", tiny_spec, "--out", out, "--max-steps", "3", "--no-progress") == 0
    assert gm("run", tiny_spec, "--out", out, "--resume", "--no-progress") == 0
    full = _metrics(out)["summary"]["ms_per_step"]
    (out / "metrics.json").unlink()  # killed after the last checkpoint, before metrics.json
    assert gm("run", tiny_spec, "--out", out, "--resume", "--no-progress") == 0
    m = _metrics(out)
    assert m["status"] == "complete" and m["summary"]["ms_per_step"] == full > 0
    record = json.loads((out / "run.json").read_text())
    walls = [i["wall_s"] for i in record["invocations"]]
    assert len(walls) == 3 and record["wall_s_total"] == pytest.approx(sum(walls), abs=2e-3) and walls[0] > 0


def test_threads_recorded_as_applied(tiny_spec, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert gm("run", tiny_spec, "--out", tmp_path / "r", "--no-progress") == 0
        assert torch.get_num_threads() == 3  # the task restores the caller's setting
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["environment"]["torch_threads"] == 1


def test_diverging_run_stops_with_a_clear_message(tmp_path, capsys):
    spec = write_spec(tmp_path, """\
        task = "gradients_digits"
        [model]
        widths = [64, 8, 10]
        [train]
        steps = 30
        optimizer = "sgd"
        momentum = 0.0
        lr = 1e30
        [collect]
        batch_size = 16
        """)
    out = tmp_path / "r"
    assert gm("run", spec, "--out", out, "--no-progress") == 3
    line = one_line_error(capsys, "train batch loss = nan at step", "diverged", "--overwrite")
    assert int(line.split("at step ")[1].split(":")[0]) < 30
    assert not (out / "metrics.json").exists() and not (out / ".lock").exists()
