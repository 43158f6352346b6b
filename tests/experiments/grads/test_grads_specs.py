"""The demo spec resolves to what ``make demo`` and the README describe and holds only differences."""
from tests.experiments.nn.spec_checks import check_minimal


def test_demo_spec():
    spec = check_minimal("gradients_digits.toml")
    assert spec["model"]["widths"] == [64, 64, 32, 10] and spec["model"]["activation"] == "relu"
    assert spec["train"]["steps"] == 600 and spec["train"]["eval_every"] == spec["collect"]["every"] == 20
    assert spec["collect"]["batch_size"] == 256
