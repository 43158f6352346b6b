"""select_variant / excess_over_best: the one-standard-error rule against a plain-Python reference."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from gradmeta import lora


def reference_one_se(losses: dict[str, list[float]]) -> str:
    means = {k: sum(v) / len(v) for k, v in losses.items()}
    best = min(means, key=means.get)
    for k, v in losses.items():
        d = [a - b for a, b in zip(v, losses[best])]
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        if sum(d) / len(d) <= se:
            return k
    raise AssertionError("the best variant always qualifies")


@pytest.mark.parametrize("seed", range(40))
def test_one_se_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 40, (), generator=g))
    base = torch.rand(n, generator=g, dtype=torch.float64)
    losses = {name: (base + shift + noise * torch.randn(n, generator=g, dtype=torch.float64)).abs()
              for name, shift, noise in (("a", 0.0, 0.0), ("b", -0.05 * seed / 10, 0.1), ("c", -0.02, 0.3))}
    want = reference_one_se({k: v.tolist() for k, v in losses.items()})
    assert lora.select_variant(losses, rule="one_se") == want
    means = {k: float(v.mean()) for k, v in losses.items()}
    assert lora.select_variant(losses) == min(means, key=means.get)
    ex = lora.excess_over_best(losses)
    assert min(ex.values())[0] == 0.0 and all(m >= 0 for m, _ in ex.values())


def test_one_se_keeps_the_earlier_variant_unless_the_gain_beats_the_noise():
    n = 50
    g = torch.Generator().manual_seed(0)
    simple = torch.ones(n, dtype=torch.float64)
    noisy = simple - 0.01 + torch.randn(n, generator=g, dtype=torch.float64)  # 0.01 better, noise 1: within 1 SE
    clear = simple - 0.5 + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)  # 0.5 better, noise 0.01
    assert float(noisy.mean()) < 1.0  # the lowest mean ...
    assert lora.select_variant({"simple": simple, "noisy": noisy}, rule="one_se") == "simple"  # ... is not enough
    assert lora.select_variant({"simple": simple, "noisy": noisy}) == "noisy"
    assert lora.select_variant({"simple": simple, "clear": clear}, rule="one_se") == "clear"
    assert lora.select_variant({"simple": simple, "twin": simple.clone()}, rule="min") == "simple"  # ties: earlier


def test_select_variant_refuses_bad_input():
    with pytest.raises(ValueError, match="rule must be one of"):
        lora.select_variant({"a": torch.ones(3)}, rule="best")
    with pytest.raises(ValueError, match="a: 3, b: 4"):
        lora.select_variant({"a": torch.ones(3), "b": torch.ones(4)})
    with pytest.raises(ValueError, match="no variant"):
        lora.select_variant({})
