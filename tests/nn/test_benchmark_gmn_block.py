"""Smoke test of benchmarks/gmn_block.py (quick mode, subprocess)."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gmn_block.py"


def test_block_benchmark_writes_every_row_for_both_sizes(tmp_path):
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "gmn_block.json").read_text())
    assert [c["name"] for c in data["cases"]] == ["S16", "S8"]
    for case in data["cases"]:
        rows = case["results"]
        assert len(rows) == 6 and all(r["time_s"] > 0 for r in rows)
        assert [r["ratio"] for r in rows[::2]] == [1.0, 1.0, 1.0]   # each group's first row is its reference
    assert (tmp_path / "gmn_block.md").read_text().startswith("#")
