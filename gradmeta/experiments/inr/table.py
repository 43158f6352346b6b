"""Merge ``inr_editing`` run folders into one held-out MSE table per training setting.

    python -m gradmeta.experiments.inr.table runs/inr_fashion_* \\
        --recorded benchmarks/results/inr_fashion_recorded.json --out benchmarks/results/inr_fashion_table

Each run folder contributes its per-seed held-out MSEs (``checkpoint.pt`` ``state.results``,
``"<variant>/seed<s>"``), grouped by (edit, training steps, zoo size, variant). A *recorded* entry
(a JSON list of ``{"edit", "steps", "train_limit", "variant", "seeds", "mean", "std", "source"}``)
stands for seeds whose run folder was not kept: only its mean and sample std over ``len(seeds)``
seeds are known, and they are pooled exactly with the per-seed values (:func:`pool`). A seed
counted twice for one cell is refused. Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import tomllib
from pathlib import Path

from gradmeta._io import atomic_write, safe_torch_load


def pool(groups: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """Mean and sample std (ddof 1) of the union of groups given as ``(mean, sample std, count)``.

    Exact: the total sum of squares is ``Σ (n_i − 1) s_i² + n_i (m_i − M)²``. A group of one has std 0.
    """
    n = sum(g[2] for g in groups)
    if n == 0:
        raise ValueError("pool: no values")
    mean = sum(m * k for m, _, k in groups) / n
    ss = sum((k - 1) * s * s + k * (m - mean) ** 2 for m, s, k in groups)
    return mean, (math.sqrt(ss / (n - 1)) if n > 1 else 0.0), n


def read_run(folder: Path) -> tuple[dict, list[dict]]:
    """``(info, rows)`` of one run folder: info has edit / steps / zoo figures; one row per finished seed."""
    spec = tomllib.loads((folder / "spec.resolved.toml").read_text())
    metrics = folder / "metrics.json"  # absent while a run is unfinished: its finished seeds still count
    summary = json.loads(metrics.read_text())["summary"] if metrics.exists() else {}
    results = safe_torch_load(folder / "checkpoint.pt")["state"]["results"]
    key = {"edit": spec["data"]["edit"], "steps": spec["train"]["steps"], "train_limit": spec["data"]["train_limit"],
           "smoothness": spec["train"].get("smoothness", 0.0)}
    info = {**key, **{k: summary.get(k) for k in ("identity_mse", "zoo_size", "zoo_psnr_mean", "zoo_inrs_per_s")}}
    rows = []
    for name, r in results.items():
        variant, _, seed = name.rpartition("/seed")
        rows.append({**key, "variant": variant, "seed": int(seed), "mse": r["mse"],
                     "train_seconds": r["train_seconds"], "source": str(folder)})
    return info, rows


def build_table(folders: list[Path], recorded: list[dict]) -> dict:
    """Cells ``"<edit>|<steps>|<train_limit>|<smoothness>|<variant>"`` -> pooled mean / std / seeds / sources.

    A recorded entry without ``"smoothness"`` was trained without the penalty (0.0).
    """
    cells: dict[str, dict] = {}
    identity: dict[str, float] = {}
    zoo: list[dict] = []
    def cell(e: dict) -> dict:
        lam = float(e.get("smoothness", 0.0))
        k = f"{e['edit']}|{e['steps']}|{e['train_limit']}|{lam:g}|{e['variant']}"
        return cells.setdefault(k, {"edit": e["edit"], "steps": e["steps"], "train_limit": e["train_limit"],
                                    "smoothness": lam, "variant": e["variant"], "groups": [], "seeds": [], "per_seed": {},
                                    "sources": []})
    for folder in folders:
        info, rows = read_run(folder)
        if info["identity_mse"] is not None:
            identity[info["edit"]] = info["identity_mse"]
        zoo.append({"run": str(folder), **{k: info[k] for k in ("zoo_size", "zoo_psnr_mean", "zoo_inrs_per_s")}})
        for r in rows:
            c = cell(r)
            if r["seed"] in c["seeds"]:
                raise ValueError(f"{folder}: seed {r['seed']} of {r['variant']} ({r['edit']}) is already in "
                                 f"{c['sources']}; pass each seed once")
            c["seeds"].append(r["seed"])
            c["per_seed"][str(r["seed"])] = r["mse"]
            c["groups"].append((r["mse"], 0.0, 1))
            c["sources"].append(r["source"])
    for e in recorded:
        c = cell(e)
        dup = sorted(set(e["seeds"]) & set(c["seeds"]))
        if dup:
            raise ValueError(f"recorded entry {e['source']!r}: seeds {dup} of {e['variant']} ({e['edit']}) "
                             f"are already in {c['sources']}")
        c["seeds"].extend(e["seeds"])
        c["groups"].append((e["mean"], e["std"], len(e["seeds"])))
        c["sources"].append(e["source"])
        if "identity_mse" in e:
            identity.setdefault(e["edit"], e["identity_mse"])
    for c in cells.values():
        c["mean"], c["std"], c["n"] = pool(c.pop("groups"))
        c["seeds"].sort()
    return {"cells": cells, "identity_mse": identity, "zoos": zoo}


VARIANTS = ["weights", "probing", "gradients:bilinear", "gradients++:bilinear"]


def _fmt(c: dict | None) -> str:
    if c is None:
        return "—"
    exp = math.floor(math.log10(abs(c["mean"])))
    return f"{c['mean'] / 10**exp:.3f}e{exp} ± {c['std'] / 10**exp:.3f}e{exp} ({c['n']})"


def to_markdown(table: dict) -> str:
    """One markdown table per (steps, train_limit, smoothness): rows are edits, columns no edit + each variant."""
    cells = table["cells"]
    settings = sorted({(c["steps"], c["train_limit"], c["smoothness"]) for c in cells.values()},
                      key=lambda s: (-s[0], -s[1], s[2]))
    out = []
    for steps, limit, lam in settings:
        edits = sorted({c["edit"] for c in cells.values()
                        if (c["steps"], c["train_limit"], c["smoothness"]) == (steps, limit, lam)})
        get = lambda e, v: cells.get(f"{e}|{steps}|{limit}|{lam:g}|{v}")  # noqa: E731
        out += [f"Editor training: {steps} steps, {limit} training INRs, smoothness penalty {lam:g}. "
                "Held-out MSE mean ± sample std (seeds).",
                "", "| edit | no edit | " + " | ".join(VARIANTS) + " | gradients vs weights | gradients++ vs weights |",
                "|---|---:|" + "---:|" * (len(VARIANTS) + 2)]
        for e in edits:
            w = get(e, "weights")
            rel = [f"{100 * (get(e, v)['mean'] / w['mean'] - 1):+.1f}%" if w and get(e, v) else "—"
                   for v in ("gradients:bilinear", "gradients++:bilinear")]
            ident = table["identity_mse"].get(e)
            out.append(f"| {e} | {ident:.3e} | " if ident else f"| {e} | — | ")
            out[-1] += " | ".join(_fmt(get(e, v)) for v in VARIANTS) + " | " + " | ".join(rel) + " |"
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="inr_editing run folders")
    p.add_argument("--recorded", type=Path, help="JSON list of summaries of seeds without a run folder")
    p.add_argument("--out", type=Path, required=True, help="output stem: writes <out>.json and <out>.md")
    a = p.parse_args(argv)
    recorded = json.loads(a.recorded.read_text()) if a.recorded else []
    table = build_table(a.runs, recorded)
    md = to_markdown(table)
    atomic_write(a.out.with_suffix(".json"), lambda f: f.write(json.dumps(table, indent=1).encode()))
    atomic_write(a.out.with_suffix(".md"), lambda f: f.write(md.encode()))
    print(md)


if __name__ == "__main__":
    main()
