"""The curvature notebook runs top to bottom (nbmake, as CI runs it)."""
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "curvature_of_your_model.ipynb"


@pytest.mark.slow
def test_curvature_notebook_executes(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbmake", "--nbmake-timeout=300",
                          "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(NOTEBOOK)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
