"""PES split over 2 CPU processes (torchrun, gloo) gives the meta-gradient of 1 process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lopt.dist_worker import pes_run

pytestmark = pytest.mark.slow  # a subprocess (> 10 s on a shared CPU)
ROOT = Path(__file__).resolve().parents[2]


def test_two_process_pes_equals_one_process(tmp_path):
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "lopt" / "dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    grads, leaves, infos = pes_run(None)
    for r in ranks:  # every rank ends with the full, identical state and meta-gradient
        for g_dist, g_one in zip(r["grads"], grads):
            for k in g_one:
                torch.testing.assert_close(g_dist[k], g_one[k], rtol=1e-5, atol=1e-7)
        for a, b in zip(r["leaves"], leaves):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for i_dist, i_one in zip(r["infos"], infos):
            assert abs(i_dist["meta_loss"] - i_one["meta_loss"]) < 1e-5
