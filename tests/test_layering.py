"""The layering of the package: grads <- nn <- {curvature, lopt, inr, lora} <- experiments <- run/cli.

Applications stand on ``grads``, ``nn``, ``data`` (and the small shared modules) only; the library
never imports the experiments, the runner or the command line.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gradmeta"
APPLICATIONS = ("curvature", "lopt", "inr", "lora")
LIBRARY = ("grads", "nn", "data", *APPLICATIONS)
LIBRARY_MODULES = ("models.py", "params.py", "_io.py", "_runtime.py", "_training.py", "__init__.py")
ABOVE_LIBRARY = {"experiments", "run", "cli", "commands", "specs", "__main__"}


def _loaded_after_import(module: str) -> set[str]:
    code = (f"import sys, {module}; "
            "print(' '.join(sorted({m.split('.')[1] for m in sys.modules if m.startswith('gradmeta.')})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("app", APPLICATIONS)
def test_application_loads_no_other_application_nor_the_runner(app):
    loaded = _loaded_after_import(f"gradmeta.{app}")
    assert app in loaded
    others = loaded & (set(APPLICATIONS) | ABOVE_LIBRARY) - {app}
    assert not others, f"import gradmeta.{app} also loads {sorted(others)}"


@pytest.mark.parametrize("base", ["grads", "nn", "data"])
def test_base_packages_load_no_application(base):
    loaded = _loaded_after_import(f"gradmeta.{base}")
    assert not loaded & (set(APPLICATIONS) | ABOVE_LIBRARY), loaded


def _imported_modules(path: Path) -> set[str]:
    """Absolute ``gradmeta...`` names imported anywhere in a file (also inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(PKG.parent).with_suffix("").parts  # e.g. ("gradmeta", "lopt", "_optim")
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base) + (f".{node.module}" if node.module else "")
                out |= {name} | {f"{name}.{a.name}" for a in node.names}
            elif node.module:
                out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("gradmeta")}


def _library_files():
    for sub in LIBRARY:
        yield from sorted((PKG / sub).rglob("*.py"))
    for name in LIBRARY_MODULES:
        if (PKG / name).exists():
            yield PKG / name


@pytest.mark.parametrize("path", list(_library_files()), ids=lambda p: str(p.relative_to(PKG)))
def test_library_never_imports_experiments_runner_or_cli(path):
    """Static check, so that imports inside functions count too."""
    area = path.relative_to(PKG).parts[0]
    bad = set()
    for m in _imported_modules(path):
        top = m.split(".")[1] if m.count(".") else ""
        if top in ABOVE_LIBRARY:
            bad.add(m)
        if area in APPLICATIONS and top in APPLICATIONS and top != area:
            bad.add(m)
    assert not bad, f"{path.relative_to(PKG.parent)} imports {sorted(bad)}"


def test_experiments_never_import_the_runner_at_run_time():
    for path in sorted((PKG / "experiments").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # top-level imports; TYPE_CHECKING blocks are fine
            if isinstance(node, ast.ImportFrom) and node.module in ("gradmeta.run", "gradmeta.cli"):
                raise AssertionError(f"{path.relative_to(PKG.parent)} imports {node.module}")
