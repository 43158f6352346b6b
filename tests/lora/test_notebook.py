"""notebooks/lora.ipynb runs top to bottom (nbmake, as CI runs it) and imports public names only."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "lora.ipynb"


def test_lora_notebook_uses_public_names_only():
    src = "\n".join("".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code")
    assert "gradmeta.experiments" not in src and not re.search(r"\w\._[a-z]", src) and "lora.train(" in src


@pytest.mark.slow
def test_lora_notebook_executes(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbmake", "--nbmake-timeout=300",
                          "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(NOTEBOOK)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
