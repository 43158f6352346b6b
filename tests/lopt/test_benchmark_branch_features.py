"""Smoke test of benchmarks/lopt_branch_features.py (subprocess, digits): it runs and writes consistent results."""

import pytest

from ..bench_run import run_benchmark

pytestmark = pytest.mark.slow  # a subprocess (> 10 s on a shared CPU)


def test_branch_features_benchmark(tmp_path):
    rows = run_benchmark("lopt_branch_features.py", tmp_path, "bf", "--name", "bf", timeout=600)["cases"][0]["results"]
    assert len(rows) == 4 * 3 and all(0 <= r["varying_share_min"] <= r["varying_share"] <= 1 for r in rows)
    assert all(0 <= r["abs_corr_grad"] <= 1 and r["max_abs_gate"] is None for r in rows)
    share = {r["rule"]: [] for r in rows}
    for r in rows:
        share[r["rule"]].append(r["varying_share"])
    # the finding the README reports: the base GradMetaNet's readouts are one number per tensor at
    # initialisation, the weight-space branch's are not
    assert max(share["GradMetaNet (base), 16 examples"]) < 1e-4 < 0.1 < min(share["weight-space"])
    assert "varying share" in (tmp_path / "bf.md").read_text()
