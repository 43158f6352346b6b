"""Markdown tables from benchmark result files (``benchmarks/results/*.json``).

A result file is a JSON object with ``title``, ``environment`` (a flat dict), optional
``settings`` and ``notes``, ``columns`` (``[{"key", "header", "format"?}]``), ``cases``
(``[{"name", "description", "results": [row, ...]}]``; a row is a dict, a failed row carries
``error``) and an optional ``summary`` (``{label: number}``). Formats: ``ms`` (seconds shown in
ms), ``ratio`` (``1.23×``), ``bytes`` (KiB/MiB/GiB), ``sci`` (``1.2e-07``); anything else is
printed as is. Missing values print as ``—``.

Usage::

    python benchmarks/tables.py                      # every results/*.json -> results/*.md
    python benchmarks/tables.py FILE.json [-o OUT.md]
    python benchmarks/tables.py FILE.json --pivot ratio:ratio   # one key, contestants × cases
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["fmt", "render", "render_table", "pivot", "main"]

_ENV_ORDER = ("device", "cpu", "cpu_count", "torch_threads", "python", "torch", "opacus",
              "backpack", "gradmeta", "git_commit", "date", "load_avg_at_start")


def fmt(value, kind: str | None = None) -> str:
    """One cell: ``value`` in the column's ``kind`` of format."""
    if value is None or value == "":
        return "—"
    if kind == "ms":
        return f"{value * 1e3:.3g} ms" if value < 1 else f"{value * 1e3:,.0f} ms"
    if kind == "ratio":
        return f"{value:.2f}×"
    if kind == "bytes":
        for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
            if abs(value) >= size:
                return f"{value / size:.3g} {unit}"
        return f"{int(value)} B"
    if kind == "sci":
        return f"{value:.1e}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_table(columns: list[dict], rows: list[dict]) -> str:
    """A markdown table; a row with ``error`` shows it in the last column."""
    lines = ["| " + " | ".join(c["header"] for c in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" if c.get("format") else "---"
                            for i, c in enumerate(columns)) + "|"]
    for row in rows:
        cells = [fmt(row.get(c["key"]), c.get("format")) for c in columns]
        if row.get("error"):
            cells[-1] = "**not run:** " + fmt(row["error"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot(data: dict, key: str, kind: str | None = None, row_key: str = "label") -> str:
    """One value ``key`` as a table: a row per contestant (``row_key``), a column per case."""
    cases = data.get("cases", [])
    labels = list(dict.fromkeys(r[row_key] for c in cases for r in c.get("results", [])))
    lines = ["| | " + " | ".join(c["name"] for c in cases) + " |",
             "|---|" + "---:|" * len(cases)]
    for label in labels:
        cells = []
        for c in cases:
            row = next((r for r in c.get("results", []) if r.get(row_key) == label), {})
            cells.append("not run" if row.get("error") else fmt(row.get(key), kind))
        lines.append(f"| {fmt(label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(data: dict) -> str:
    """The whole markdown document for one result file."""
    out = [f"# {data.get('title', data.get('benchmark', 'Benchmark'))}", ""]
    env = data.get("environment", {})
    keys = [k for k in _ENV_ORDER if k in env] + sorted(k for k in env if k not in _ENV_ORDER)
    out.append("Environment: " + "; ".join(f"{k} {env[k]}" for k in keys if env[k] is not None) + ".")
    if data.get("settings"):
        out.append("Settings: " + ", ".join(f"{k}={v}" for k, v in data["settings"].items()) + ".")
    out.append("")
    for case in data.get("cases", []):
        out += [f"## {case.get('name')}", "", case.get("description", ""), "",
                render_table(data["columns"], case.get("results", [])), ""]
    if data.get("summary"):
        out += ["## Summary", ""] + [f"- {k}: {fmt(v, 'ratio')}" for k, v in data["summary"].items()]
        out.append("")
    if data.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables from benchmarks/results/*.json")
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("-o", "--output", type=Path, help="output file (one input only)")
    p.add_argument("--pivot", metavar="KEY[:FORMAT]",
                   help="print only KEY as a contestants × cases table (one input only)")
    args = p.parse_args(argv)
    files = args.files or sorted((Path(__file__).resolve().parent / "results").glob("*.json"))
    if (args.output or args.pivot) and len(files) != 1:
        p.error("-o and --pivot need exactly one input file")
    if args.pivot:
        key, _, kind = args.pivot.partition(":")
        print(pivot(json.loads(files[0].read_text()), key, kind or None))
        return 0
    for f in files:
        data = json.loads(f.read_text())
        if not {"columns", "cases"} <= set(data):  # another layout: leave its markdown alone
            print(f"skipped {f}: no 'columns' and 'cases'", file=sys.stderr)
            continue
        md = render(data)
        target = args.output or f.with_suffix(".md")
        target.write_text(md)
        print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
