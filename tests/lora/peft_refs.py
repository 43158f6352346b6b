"""Reference adapters: written by the real ``peft`` library on small torch models (never hand-written files)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="the lora extra (peft) is needed to write reference adapters")
from peft import LoraConfig, get_peft_model  # noqa: E402


class Mixed(nn.Module):
    """Linear, Embedding, Conv1d and Conv2d targets, and 12 blocks to check natural sorting."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(3, 5, 3)
        self.conv1x1 = nn.Conv2d(5, 4, 1)
        self.c1 = nn.Conv1d(3, 4, 2)
        self.lin = nn.Linear(6, 7)
        self.blocks = nn.ModuleList(nn.Linear(4, 3) for _ in range(12))
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        return self.head(self.lin(self.emb(x)))


class GPT2Like(nn.Module):
    """GPT-2 style ``Conv1D`` layers (weight stored (in, out)): PEFT uses ``fan_in_fan_out``."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.c_attn = Conv1D(9, 6)
        self.c_proj = Conv1D(6, 3)

    def forward(self, x):
        return self.c_proj(self.c_attn(x)[..., :3])


MIXED_TARGETS = r"(emb|conv|conv1x1|c1|lin|blocks\.\d+)"  # a string is a full-match regex in PEFT


def make_peft(model: nn.Module, seed: int = 0, **config):
    """``get_peft_model`` with random (non-zero) A and B so deltas are informative."""
    torch.manual_seed(seed)
    config.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(**config))


def peft_deltas(pm, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's own ``get_delta_weight`` for every adapted module, keyed by module name."""
    from peft.tuners.lora import LoraLayer
    base = pm.base_model.model
    return {name: mod.get_delta_weight(adapter).detach() for name, mod in base.named_modules()
            if isinstance(mod, LoraLayer) and adapter in mod.scaling}


def save(pm, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(path), **kw)
    return path


# A tiny lora_zoo spec: 12 adapters of ranks 2 and 4, a few steps each (seconds on a CPU).
ZOO_SPEC = """task = "lora_zoo"
n_adapters = 12
[base]
steps = 60
[finetune]
ranks = [2, 4]
steps_min = 5
steps_max = 15
"""
