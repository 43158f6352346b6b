"""`torchrun -m gradmeta run`: two CPU processes (gloo), rank 0 owns the run folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_processes_meta_train(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "gradmeta", "run",
           str(ROOT / "tasks" / "lopt_digits.toml"), "--out", str(out), "--max-steps", "2", "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "stopped" and metrics["step"] == 2
    assert len(json.loads((out / "run.json").read_text())["invocations"]) == 1   # only rank 0 wrote
