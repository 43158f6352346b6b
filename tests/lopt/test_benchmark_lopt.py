"""Smoke test of benchmarks/lopt.py (quick sizes, subprocess): it runs and writes consistent results."""
import json

import pytest

from ..bench_run import run_benchmark

pytestmark = pytest.mark.slow  # a subprocess (> 10 s on a shared CPU)


def test_quick_lopt_benchmark(tmp_path):
    data = run_benchmark("lopt.py", tmp_path, "lopt_step", "--quick")
    assert [c["name"] for c in data["cases"]] == ["digits", "mlp1024"]
    for case in data["cases"]:
        adam, learned = case["results"]
        assert adam["ratio"] == 1.0 and learned["step_s"] > 0 and learned["update_s"] <= learned["step_s"]
        assert adam["state_ratio"] == 2.0 and learned["state_ratio"] == 7.0  # Adam: m, v; learned: 6 momenta, v
        assert learned["floor"] == 1 + 1536 / 384 and learned["mlp_s"] > 0
        want = (adam["step_s"] - adam["update_s"] + learned["mlp_s"]) / adam["step_s"]
        assert abs(learned["measured_floor"] - want) < 1e-12
    assert "LearnedOptimizer" in (tmp_path / "lopt_step.md").read_text()
    pes = json.loads((tmp_path / "lopt_pes.json").read_text())["cases"][0]["results"]
    assert pes[0]["label"].startswith("per-parameter") and pes[0]["ratio"] == 1.0
    assert all(r["iter_s"] > 0 and abs(r["ratio"] - r["iter_s"] / pes[0]["iter_s"]) < 1e-12 for r in pes)
    assert {r["target"] for r in pes} == {None, 2.0, 5.0}
    assert pes[0]["paired_ratio"] == 1.0 and all(r["paired_ratio"] > 0 for r in pes)


def test_quick_pes_suite_runs_only_the_rules_asked_for(tmp_path):
    data = run_benchmark("lopt.py", tmp_path, "lopt_pes_some", "--quick", "--suite", "pes", "--stem", "lopt_pes_some",
                         "--only", "bilinear", "statistics")
    labels = [r["label"] for r in data["cases"][0]["results"]]
    assert len(labels) == 3 and labels[0].startswith("per-parameter")
    assert "bilinear" in labels[1] and "GradientStatsLO" in labels[2]
