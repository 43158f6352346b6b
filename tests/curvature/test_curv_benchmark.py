"""Smoke test of benchmarks/curvature.py --quick: every contestant runs and agrees with gradmeta."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "curvature.py"


@pytest.mark.slow
def test_curvature_benchmark_quick(tmp_path):
    res = subprocess.run([sys.executable, str(BENCH), "--quick", "--cases", "mlp", "--trace-rounds", "1",
                          "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, cwd=BENCH.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "curvature.json").read_text())
    assert (tmp_path / "curvature.md").exists() and data["environment"]["torch_threads"] == 1
    rows = {c["name"].split(": ", 1)[1].split(",")[0]: c["results"] for c in data["cases"]}
    assert not [r for part in rows.values() for r in part if "error" in r]
    assert all(r["rel_diff"] < 1e-5 for r in rows["time per Hessian-vector product"] if "rel_diff" in r)
    trace = {r["method"]: r for r in rows["Hutchinson trace"]}
    assert abs(trace["gradmeta hutchinson"]["estimate"] - trace["PyHessian trace"]["estimate"]) < 1e-4 * \
        abs(trace["PyHessian trace"]["estimate"]) or trace["PyHessian trace"]["hvps"] < 100
    assert all(r["rel_err"] < 1e-3 for r in rows["top eigenvalue"] if r["method"] == "gradmeta Lanczos")
