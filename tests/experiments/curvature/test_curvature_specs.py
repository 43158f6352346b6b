"""The shipped curvature specs resolve, hold only what differs from the defaults, and the README's
``--set`` variants resolve to the settings the README reports."""
import pytest

from gradmeta.specs import load_spec, resolve_spec
from tests.experiments.nn.spec_checks import TASKS_DIR, check_minimal


@pytest.mark.parametrize("name", sorted(p.name for p in TASKS_DIR.glob("curvature_*.toml")))
def test_every_curvature_spec_resolves_and_holds_only_differences(name):
    assert check_minimal(name)["task"].startswith("curvature_learned")


def test_fisher_spec_and_documented_overrides():
    path = TASKS_DIR / "curvature_learned_fisher.toml"
    spec = check_minimal(path.name)
    assert spec["data"] == {"set_size": 128, "num_points": 1024, "hidden": 32, "test_size": 128, "seed": 0}
    assert spec["train"] == {"steps": 800, "batch_size": 8, "lr": 3e-3} and spec["plusplus_steps"] == 80
    assert spec["seeds"] == [0, 1, 2] and spec["train_sizes"] == [32, 256]
    long = resolve_spec(load_spec(path, ['models=["gradmetanet"]', "train_sizes=[256]", "train.steps=3000"]), path)
    assert long["train"]["steps"] == 3000 and long["models"] == ["gradmetanet"] and long["data"] == spec["data"]


def test_trace_spec():
    spec = check_minimal("curvature_learned_trace.toml")
    assert spec["widths"] == [32, 64] and spec["train_size"] == 256 and spec["data"]["test_size"] == 128
    assert spec["train"] == {"steps": 500, "batch_size": 8, "lr": 3e-3} and "gradmetanet++" not in spec["models"]
