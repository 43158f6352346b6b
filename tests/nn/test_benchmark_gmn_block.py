"""Smoke test of benchmarks/gmn_block.py (quick mode, subprocess)."""
from ..bench_run import run_benchmark


def test_block_benchmark_writes_every_row_for_both_sizes(tmp_path):
    data = run_benchmark("gmn_block.py", tmp_path, "gmn_block", "--quick")
    assert [c["name"] for c in data["cases"]] == ["S16", "S8"]
    for case in data["cases"]:
        rows = case["results"]
        assert len(rows) == 6 and all(r["time_s"] > 0 for r in rows)
        assert [r["ratio"] for r in rows[::2]] == [1.0, 1.0, 1.0]   # each group's first row is its reference
    assert (tmp_path / "gmn_block.md").read_text().startswith("#")
