"""Smoke test of benchmarks/gmn_attention_memory.py on a tiny gradient set."""
from ..bench_run import run_benchmark


def test_attention_memory_benchmark_writes_both_modes(tmp_path):
    data = run_benchmark("gmn_attention_memory.py", tmp_path, "gmn_attention_memory", "--examples", "2")
    assert [r["mode"] for r in data["rows"]] == ["fused", "explicit"]
    assert all(r["examples"] == 2 and r["peak_rss_gib"] > 0 and r["seconds"] > 0 for r in data["rows"])
    assert data["environment"]["device"] == "cpu"
