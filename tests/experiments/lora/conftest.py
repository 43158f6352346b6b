"""Session fixture: a tiny LoRA zoo built by the ``lora_zoo`` task."""
from __future__ import annotations

import pytest

pytest.importorskip("peft", reason="the lora extra (peft) is needed to build the zoo")

from gradmeta.run import run_spec  # noqa: E402
from tests.lora.peft_refs import ZOO_SPEC  # noqa: E402


@pytest.fixture(scope="session")
def zoo_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo_task")
    (d / "zoo.toml").write_text(ZOO_SPEC)
    out = run_spec(d / "zoo.toml", d / "run", progress=False)
    return d, out
