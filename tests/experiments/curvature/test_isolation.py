"""The curvature library stands apart from its studies: importing it loads no other application,
no experiment and no runner; no library module imports ``gradmeta.experiments.curvature``."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
FORBIDDEN = ("gradmeta.inr", "gradmeta.lopt", "gradmeta.lora", "gradmeta.experiments", "gradmeta.run",
             "gradmeta.cli", "gradmeta.commands", "gradmeta.specs")


def _loaded_after(module: str) -> list[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('gradmeta')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("module, allowed", [
    ("gradmeta.curvature", ("gradmeta", "gradmeta.curvature", "gradmeta.grads", "gradmeta.nn", "gradmeta.params")),
    ("gradmeta._training", ("gradmeta", "gradmeta._training")),
])
def test_import_loads_no_other_application(module, allowed):
    loaded = _loaded_after(module)
    assert module in loaded
    bad = [m for m in loaded if m.startswith(FORBIDDEN)]
    assert not bad, f"import {module} loads {bad}"
    stray = [m for m in loaded if not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not stray, f"import {module} loads {stray}"


def test_no_library_module_imports_the_curvature_studies():
    pattern = re.compile(r"^\s*(from|import)\s+(gradmeta\.experiments|\.+experiments)", re.M)
    top = ("grads", "nn", "curvature", "lopt", "inr", "lora", "data", "models.py", "params.py", "_io.py",
           "_runtime.py", "_training.py")
    library = [p for p in (ROOT / "gradmeta").rglob("*.py") if p.relative_to(ROOT / "gradmeta").parts[0] in top]
    assert any(p.name == "_fisher.py" for p in library)
    bad = [str(p.relative_to(ROOT)) for p in library if pattern.search(p.read_text())]
    assert not bad, f"library modules import the experiments: {bad}"
