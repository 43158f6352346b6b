"""Helpers shared by the benchmark scripts: environment record, peak memory, result files."""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent


def sync(device: str) -> None:
    """Wait for queued CUDA work so that a timer sees it (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def error_text(e: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters, for a result row."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


def _proc_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(fn: Callable[[], Any], device: str) -> tuple[Any, int, str]:
    """Run ``fn()`` once; return its result, the peak memory above the level right before the
    call (bytes) and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch does not track allocations, so the
    resident set: the kernel's peak mark (VmHWM) is reset through ``/proc/self/clear_refs``;
    without it ``ru_maxrss`` is used, which is monotonic and right only if nothing before the
    call peaked higher. Call it in a fresh process: freed memory kept by the allocator from
    earlier work hides part of the peak.
    """
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        sync(device)
        return result, torch.cuda.max_memory_allocated() - before, "cuda max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = _proc_status("VmRSS") or 0
    result = fn()
    hwm = _proc_status("VmHWM") if reset else None
    if hwm is not None:
        return result, hwm - before, "RSS: VmHWM after clear_refs"
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, "RSS: ru_maxrss"


def _allocator_kept() -> bool:
    from gradmeta._runtime import environment as runtime_environment

    return runtime_environment()["keep_freed_cpu_memory"]


def environment(device: str, packages: tuple[str, ...] = ()) -> dict:
    """Device, CPU model, threads, Python/torch/package versions, git commit and UTC date."""
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None
    cpu = platform.processor() or None
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                capture_output=True).stdout.strip() or None
    except OSError:
        commit = None
    env = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__,
        "keep_freed_cpu_memory": _allocator_kept(),
    }
    env.update({pkg.removesuffix("-for-pytorch"): version(pkg) for pkg in packages})
    env.update({"git_commit": commit, "platform": platform.platform(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return env


ALLOCATORS = ("keep", "default")


def add_allocator_option(ap) -> None:
    """``--allocator keep|default``: whether the process calls ``gradmeta.keep_freed_cpu_memory()``."""
    ap.add_argument("--allocator", choices=ALLOCATORS, default="keep",
                    help="keep: glibc keeps freed CPU memory for reuse (gradmeta.keep_freed_cpu_memory, as the "
                         "gradmeta command does); default: glibc's default (fresh pages for large tensors)")


def set_allocator(choice: str) -> str:
    """Apply ``--allocator`` (before any timing); returns the suffix of result files (``""`` or ``"_default_allocator"``)."""
    if choice == "keep":
        from gradmeta import keep_freed_cpu_memory

        keep_freed_cpu_memory()
        return ""
    return "_default_allocator"


def write_results(data: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``out_dir/stem.json`` and its markdown rendering ``out_dir/stem.md``."""
    spec = importlib.util.spec_from_file_location("_gradmeta_bench_tables", HERE / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(data, indent=1) + "\n")
    md.write_text(tables.render(data))
    return js, md
