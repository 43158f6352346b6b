"""Session fixtures: PEFT-written adapter folders (see :mod:`tests.lora.peft_refs`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="the lora extra (peft) is needed to write reference adapters")

from tests.lora.peft_refs import MIXED_TARGETS, Mixed, make_peft, peft_deltas, save  # noqa: E402


@pytest.fixture(scope="session")
def mixed_adapter(tmp_path_factory):
    """(folder, PEFT deltas): rsLoRA, rank and alpha patterns, every target type, modules_to_save."""
    torch.manual_seed(0)
    pm = make_peft(Mixed(), r=4, lora_alpha=8, target_modules=MIXED_TARGETS, use_rslora=True,
                   rank_pattern={"lin": 2, "blocks.3": 3}, alpha_pattern={"conv": 3, "emb": 5},
                   modules_to_save=["head"])
    folder = save(pm, tmp_path_factory.mktemp("mixed") / "ad")
    return folder, peft_deltas(pm)


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory):
    """Six adapters of one Mixed-like MLP (ranks 2, 4, 8) written by PEFT, plus labels.csv."""
    root = tmp_path_factory.mktemp("zoo")
    rows = ["adapter,acc,group"]
    for i, r in enumerate([2, 4, 8, 2, 4, 8]):
        torch.manual_seed(100)
        base = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
        pm = make_peft(base, seed=i, r=r, lora_alpha=2 * r, target_modules=["0", "2"])
        save(pm, root / f"ad{i}")
        rows.append(f"ad{i},{0.1 * i},g{i % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root

