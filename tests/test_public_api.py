"""Public surface: every public name has a docstring; README tables generated from code match."""
import importlib
import inspect
from pathlib import Path

import pytest

PUBLIC_MODULES = ["gradmeta", "gradmeta.grads", "gradmeta.models", "gradmeta.data", "gradmeta.curvature",
                  "gradmeta.nn", "gradmeta.lora", "gradmeta.lopt", "gradmeta.inr", "gradmeta.run", "gradmeta.cli", "gradmeta.experiments",
                  "gradmeta.specs", "gradmeta.params", "gradmeta.commands"]
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_names_have_docstrings(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__, module_name
    assert hasattr(module, "__all__"), f"{module_name} must list its public names in __all__"
    missing = [n for n in module.__all__
               if (inspect.isclass(getattr(module, n)) or inspect.isfunction(getattr(module, n)))
               and not inspect.getdoc(getattr(module, n))]
    assert not missing, f"{module_name}: no docstring for {missing}"


def test_readme_support_table_is_generated_from_registry():
    from gradmeta.grads import support_table
    assert support_table() in README.read_text()
