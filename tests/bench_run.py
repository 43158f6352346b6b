"""Run a benchmark script of ``benchmarks/`` the way a user does (a subprocess) and read its result."""
import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, out: Path, result: str, *args: str, timeout: int = 300) -> dict:
    """``python benchmarks/<script> *args --out out``; fails the test with the script's stderr if it
    exits non-zero; returns the JSON object in ``out/<result>.json``."""
    p = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((Path(out) / f"{result}.json").read_text())
