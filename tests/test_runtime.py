"""``keep_freed_cpu_memory``: glibc keeps freed blocks for reuse; the ``gradmeta`` command turns it on."""
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# bytes that glibc maps (mmap) for a new 16 MiB tensor
PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    import gradmeta
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    if sys.argv[1] == "keep":
        assert gradmeta.keep_freed_cpu_memory() is True
        assert gradmeta.keep_freed_cpu_memory() is True  # a second call changes nothing
    before = libc.mallinfo2().hblkhd
    t = torch.ones(1 << 22)
    print(libc.mallinfo2().hblkhd - before, float(t.sum()))
""")


def _mapped_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    mapped, total = out.stdout.split()
    assert float(total) == 1 << 22
    return int(mapped)


@pytest.mark.skipif(not GLIBC, reason="the allocator setting exists on Linux with glibc only")
def test_large_tensors_come_from_the_reused_heap():
    assert _mapped_bytes("default") >= 16 << 20     # glibc's default: a fresh mapping for the tensor
    assert _mapped_bytes("keep") == 0                # from the heap


def test_other_platforms_report_not_applied(monkeypatch):
    from gradmeta import _runtime
    monkeypatch.setattr(_runtime.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(_runtime, "_KEPT", False)
    assert _runtime.keep_freed_cpu_memory() is False


def test_the_command_turns_it_on_and_records_it(tmp_path):
    spec = Path(__file__).parents[1] / "tasks" / "gradients_digits.toml"
    env_of = {}
    for flag in ("1", "0"):
        out = tmp_path / f"run{flag}"
        subprocess.run([sys.executable, "-m", "gradmeta", "run", str(spec), "--out", str(out), "--no-progress",
                        "--set", "train.steps=2", "--set", "train.eval_every=1", "--set", "collect.every=1"],
                       check=True, capture_output=True, env={**os.environ, "GRADMETA_KEEP_FREED_MEMORY": flag})
        env_of[flag] = json.loads((out / "run.json").read_text())["environment"]["keep_freed_cpu_memory"]
    assert env_of == {"1": GLIBC, "0": False}
