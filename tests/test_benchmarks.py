"""Smoke test of benchmarks/grads.py (quick mode, in subprocesses) and benchmarks/tables.py."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
CONTESTANTS = {"plain", "hooks", "gm_func", "opacus", "backpack", "func_vmap", "naive"}


def _run(*args, timeout=120):
    p = subprocess.run([sys.executable, str(BENCH / "grads.py"), *args], capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _tables():
    spec = importlib.util.spec_from_file_location("bench_tables", BENCH / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_benchmark_writes_consistent_results(tmp_path):
    # The memory probes (one fresh process per contestant) are exercised separately below.
    _run("--quick", "--no-memory", "--models", "mlp_b128", "gpt", "--out", str(tmp_path))
    data = json.loads((tmp_path / "grads.json").read_text())
    env = data["environment"]
    for key in ("device", "cpu", "torch_threads", "python", "torch", "opacus", "backpack", "date"):
        assert key in env, key
    assert env["torch_threads"] == 1 and data["settings"]["repeats"] == 2
    assert [c["name"] for c in data["cases"]] == ["mlp_b128", "gpt"]
    for case in data["cases"]:
        rows = {r["contestant"]: r for r in case["results"]}
        assert set(rows) == CONTESTANTS
        assert rows["plain"]["ratio"] == 1.0
        for name in ("plain", "hooks", "gm_func", "func_vmap", "naive"):
            assert "error" not in rows[name], (case["name"], rows[name])
        for name, r in rows.items():
            if "error" in r:  # a peer may not support a model, but must say why
                assert r["error"] and "ratio" not in r
                continue
            assert len(r["times_s"]) == 2 and r["median_s"] > 0 and r["ratio"] > 0
            assert r["max_rel_err"] < 1e-4, (case["name"], name, r["max_rel_err"])
            assert r["missing_params"] == [] and r["result_bytes"] > 0
        # factors are smaller than full per-example gradients on the MLP
        if case["name"] == "mlp_b128":
            assert rows["hooks"]["result_bytes"] < rows["func_vmap"]["result_bytes"]
    md = (tmp_path / "grads.md").read_text()
    assert md == _tables().render(data)
    assert "| contestant | median time | × plain |" in md and "## gpt" in md


def test_memory_probe_reports_peak_and_result_size():
    p = _run("--one", "func_vmap", "--model", "gpt", "--quick")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert rec["peak_mem_bytes"] >= 0 and rec["mem_method"]
    # full per-example gradients of the quick GPT: B=4 times every parameter in float32
    from gradmeta.models import GPT
    n_params = sum(q.numel() for q in GPT(32, 16, 2, 1, 8).parameters())
    assert rec["result_bytes"] == 4 * n_params * 4


def test_tables_formats_and_errors(tmp_path):
    tables = _tables()
    assert tables.fmt(0.0123, "ms") == "12.3 ms" and tables.fmt(2.5, "ratio") == "2.50×"
    assert tables.fmt(3 * 2 ** 20, "bytes") == "3 MiB" and tables.fmt(None) == "—"
    data = {"title": "T", "environment": {"device": "cpu"},
            "columns": [{"key": "label", "header": "who"}, {"key": "t", "header": "t", "format": "ms"},
                        {"key": "note", "header": "notes"}],
            "cases": [{"name": "c", "description": "d",
                       "results": [{"label": "a", "t": 0.5}, {"label": "b", "error": "X: no | way"}]}],
            "summary": {"a / b": 2.0}}
    f = tmp_path / "x.json"
    f.write_text(json.dumps(data))
    assert tables.main([str(f)]) == 0
    md = (tmp_path / "x.md").read_text()
    assert "| a | 500 ms | — |" in md and "**not run:** X: no \\| way" in md and "- a / b: 2.00×" in md
    assert tables.pivot(data, "t", "ms").splitlines()[2:] == ["| a | 500 ms |", "| b | not run |"]
