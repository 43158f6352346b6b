"""Learned-optimizer and LoRA-model checkpoints that are not ours: one clear refusal naming the file."""
from __future__ import annotations

import os

import pytest
import torch


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _bad_files(tmp_path):
    (tmp_path / "random.pt").write_bytes(os.urandom(256))
    good = tmp_path / "good.pt"
    torch.save({"a": torch.zeros(3)}, good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:40])
    torch.save({"x": _Payload()}, tmp_path / "code.pt")
    return ["random.pt", "truncated.pt", "code.pt"]


def test_learned_optimizer_checkpoint_refusals(tmp_path):
    from gradmeta.lopt import load_checkpoint
    for name in _bad_files(tmp_path):
        with pytest.raises(ValueError, match=rf"{name} is not a gradmeta learned-optimizer checkpoint or contains "
                                             r"code; refusing to load"):
            load_checkpoint(tmp_path / name)


def test_lora_model_checkpoint_refusals(tmp_path):
    from gradmeta import lora
    for name in _bad_files(tmp_path):
        with pytest.raises(ValueError, match=rf"{name} is not a gradmeta LoRA model checkpoint or contains code"):
            lora.load_model(tmp_path / name)


def test_learned_optimizer_step_on_an_empty_batch_is_skipped_and_counted():
    """The mean loss of an empty batch is nan: with a closure the step is skipped, nothing moves."""
    from torch import nn

    from gradmeta.lopt import LearnedOptimizer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = LearnedOptimizer(model.parameters())
    x, y = torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    assert torch.isnan(opt.step(closure))
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
