"""gradmeta.lora public surface: every public class/function has a docstring."""
import inspect

from gradmeta import lora


def test_public_names_have_docstrings():
    assert lora.__doc__
    missing = [n for n in lora.__all__ if (inspect.isclass(getattr(lora, n)) or inspect.isfunction(getattr(lora, n)))
               and not inspect.getdoc(getattr(lora, n))]
    assert not missing, missing
