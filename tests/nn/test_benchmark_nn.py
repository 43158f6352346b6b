"""Smoke test of benchmarks/nn.py (quick sizes, subprocess): it runs and writes consistent results."""
import subprocess
import sys
from pathlib import Path

import pytest

from ..bench_run import run_benchmark

pytestmark = pytest.mark.slow  # subprocesses with the full benchmark code path (> 10 s on a shared CPU)

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "nn.py"


def test_quick_perf_benchmark(tmp_path):
    data = run_benchmark("nn.py", tmp_path, "nn", "--quick")
    assert set(data["times"]) == {"mlp_step", "collect", "gmn_base", "gmn_plusplus", "per_param_deepsets",
                                  "gmn_base_bilinear", "gmn_plusplus_bilinear"}
    assert data["environment"]["device"] == "cpu"
    assert {r["variant"] for r in data["memory"]} == {"base", "plusplus", "base (bilinear)", "plusplus (bilinear)"}
    assert (tmp_path / "nn_memory.png").exists() and "× MLP training step" in (tmp_path / "nn.md").read_text()


def test_quick_perf_benchmark_subset(tmp_path):
    data = run_benchmark("nn.py", tmp_path, "sub", "--quick", "--stem", "sub", "--contestants", "mlp_step,gmn_base_bilinear")
    assert set(data["times"]) == {"mlp_step", "gmn_base_bilinear"}
    assert {r["variant"] for r in data["memory"]} == {"base (bilinear)"}
    bad = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path), "--contestants", "gmn_bogus"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "contestants" in bad.stderr
