"""Replace one model's rows of a ``lora_predict`` results JSON with those of a newer run.

Used when one model changes and only it is rerun (``gradmeta run tasks/<spec>.toml --set
'models=["GLNet"]'``): every other model's figures stay those of the earlier full run (the task is
deterministic on one thread; the rerun of SVDMLP on the same machine reproduced its figures exactly).
The merged file records where the rows came from under ``"merged"``.

    python benchmarks/lora_merge_rows.py runs/glnet/lora_accuracy benchmarks/results/lora_accuracy.json --model GLNet
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder of the newer lora_predict run (holds metrics.json)")
    p.add_argument("results", help="results JSON to update in place")
    p.add_argument("--model", default="GLNet")
    a = p.parse_args(argv)
    new = json.loads((Path(a.run) / "metrics.json").read_text())
    old = json.loads(Path(a.results).read_text())
    pre = f"{a.model}/"
    for part in ("summary", "history"):
        old[part] = {**{k: v for k, v in new[part].items() if k.startswith(pre)},  # its rows first, as before
                     **{k: v for k, v in old[part].items() if not k.startswith(pre)}}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    spec = (Path(a.run) / "spec.resolved.toml")
    old.setdefault("merged", []).append({"model": a.model, "from": str(a.run), "commit": commit,
                                         "spec": spec.read_text() if spec.exists() else None})
    Path(a.results).write_text(json.dumps(old, indent=1))
    print(f"{a.results}: {a.model} rows from {a.run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
