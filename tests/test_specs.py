"""Every shipped spec in tasks/ names a registered task and resolves (keys, types, values)."""
from pathlib import Path

import pytest

from gradmeta.run import load_spec, resolve_spec

SPECS = sorted((Path(__file__).resolve().parents[1] / "tasks").glob("*.toml"))


def test_there_are_specs():
    assert len(SPECS) >= 5


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_resolves(path):
    spec = resolve_spec(load_spec(path), path)
    assert spec["task"]
