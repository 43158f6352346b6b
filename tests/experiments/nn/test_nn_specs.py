"""The shipped nn_capability specs: a base plus small variants that resolve to the README settings."""
import pytest

from gradmeta.experiments.nn.capability import MODELS, TARGETS
from gradmeta.specs import load_spec, resolve_spec

from .spec_checks import TASKS_DIR, check_minimal

BILINEAR = ["GradMetaNet (bilinear)", "GradMetaNet++ (bilinear)"]


@pytest.mark.parametrize("name", sorted(p.name for p in TASKS_DIR.glob("nn_*.toml")))
def test_every_nn_spec_resolves_and_holds_only_differences(name):
    spec = check_minimal(name)
    assert spec["task"] == "nn_capability" and spec["data"]["set_size"] == 32 and spec["train"]["lr"] == 3e-3


def test_variants_resolve_to_the_readme_settings():
    base = check_minimal("nn_capability.toml")
    assert base["targets"] == list(TARGETS) and base["models"] == list(MODELS) and base["train"]["steps"] == 300
    long = check_minimal("nn_capability_long.toml")
    assert long["train"]["steps"] == 1500 and long["targets"] == ["fisher_diag", "adam_direction"]
    bil = check_minimal("nn_capability_long_bilinear.toml")
    assert bil["train"]["steps"] == 1500 and bil["models"] == BILINEAR + ["averaged-gradient net"]
    c5000 = check_minimal("nn_capability_c5000.toml")
    assert c5000["train"]["steps"] == 5000 and c5000["models"] == BILINEAR and c5000["targets"] == ["adam_direction"]
    for spec in (long, bil, c5000):  # the variants change nothing else
        rest = {k: v for k, v in spec.items() if k not in ("targets", "models", "train")}
        assert rest == {k: v for k, v in base.items() if k not in ("targets", "models", "train")}


def test_documented_seed_command_resolves():
    """The README's extra seeds: the long bilinear spec with --set seed=1 and two targets."""
    path = TASKS_DIR / "nn_capability_long_bilinear.toml"
    spec = resolve_spec(load_spec(path, ["seed=1", 'targets=["fisher_diag","adam_direction"]']), path)
    assert spec["seed"] == 1 and spec["targets"] == ["fisher_diag", "adam_direction"]
    assert spec["train"]["steps"] == 1500 and spec["models"] == BILINEAR + ["averaged-gradient net"]
