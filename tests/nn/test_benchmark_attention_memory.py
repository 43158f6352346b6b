"""Smoke test of benchmarks/gmn_attention_memory.py on a tiny gradient set."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gmn_attention_memory.py"


def test_attention_memory_benchmark_writes_both_modes(tmp_path):
    p = subprocess.run([sys.executable, str(BENCH), "--examples", "2", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "gmn_attention_memory.json").read_text())
    assert [r["mode"] for r in data["rows"]] == ["fused", "explicit"]
    assert all(r["examples"] == 2 and r["peak_rss_gib"] > 0 and r["seconds"] > 0 for r in data["rows"])
    assert data["environment"]["device"] == "cpu"
