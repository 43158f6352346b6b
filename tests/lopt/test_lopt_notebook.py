"""The learned-optimizer notebook runs top to bottom (nbmake), including the scikit-learn own-task example."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "learned_optimizer.ipynb"
pytestmark = pytest.mark.slow  # about 35 s on a shared CPU


def test_learned_optimizer_notebook_executes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbmake", "--nbmake-timeout=600",
                          "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(NOTEBOOK)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
