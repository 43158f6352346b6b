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


def _single_process_group(monkeypatch, tmp_path):
    """Make ``distributed_context`` see ``torchrun``'s environment and create a real one-process gloo
    group (``WORLD_SIZE`` says 2 so that it initialises; the group itself has one rank)."""
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    real_init = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None: real_init(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1))
    return real_init


def test_close_distributed_destroys_only_the_group_gradmeta_created(monkeypatch, tmp_path):
    import torch.distributed as dist

    from gradmeta._runtime import close_distributed, distributed_context

    real_init = _single_process_group(monkeypatch, tmp_path)
    assert distributed_context() == (0, 1)
    assert dist.is_initialized()
    close_distributed()
    assert not dist.is_initialized()
    close_distributed()  # nothing left: a no-op

    # a group the caller created is the caller's
    real_init("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    try:
        assert distributed_context() == (0, 1)
        close_distributed()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_the_command_tears_down_the_group_it_created(monkeypatch, tmp_path):
    import torch.distributed as dist

    from gradmeta import cli
    from gradmeta._runtime import distributed_context

    _single_process_group(monkeypatch, tmp_path)
    parser = cli.build_parser()
    args = parser.parse_args(["report", str(tmp_path)])
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    seen = {}

    def command(a):
        seen["ranks"] = distributed_context()
        seen["inside"] = dist.is_initialized()
        return 0

    args.func = command
    assert cli.main([]) == 0
    assert seen == {"ranks": (0, 1), "inside": True}
    assert not dist.is_initialized()

    # after a failure the group is left to the exiting process (other ranks may be in a collective)
    def failing(a):
        distributed_context()
        raise RuntimeError("boom")

    args.func = failing
    try:
        with pytest.raises(RuntimeError, match="boom"):
            cli.main([])
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
