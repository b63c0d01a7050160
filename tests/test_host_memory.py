"""lorakit.host_memory: large blocks come from a heap that keeps freed memory, and `lorakit train`, `sample` and
`eval` ask for it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lorakit import host_memory
from lorakit.errors import LorakitError

# glibc's own account (mallinfo2) of a 64 MiB block, above its largest mmap threshold (32 MiB): the bytes in mmapped
# blocks while it is held, and how much the heap grew once it is freed
CHILD = textwrap.dedent("""
    import ctypes, sys, torch
    from lorakit.host_memory import keep_freed_memory

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    before = libc.mallinfo2()
    block = torch.ones(16 * 2**20)
    held = libc.mallinfo2()
    del block
    freed = libc.mallinfo2()
    print(applied, held.hblkhd - before.hblkhd, freed.arena - before.arena)
""")
MIB64 = 64 * 2**20


def _child(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int, int]:
    """Whether keep_freed_memory applied, the mmapped bytes added while the block is held, the heap's growth
    once it is freed."""
    import os

    inherited = {k: v for k, v in os.environ.items() if k != host_memory.ENV_SWITCH}  # conftest sets it for tests
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120,
                          env={**inherited, **(env or {})})
    assert done.returncode == 0, done.stderr
    applied, mmapped, heap = done.stdout.split()
    return applied == "True", int(mmapped), int(heap)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_large_block_comes_from_the_heap_and_stays_there():
    applied, mmapped, heap = _child("default")
    assert not applied and mmapped >= MIB64 and heap < MIB64  # mapped for itself, unmapped on free
    applied, mmapped, heap = _child("keep")
    assert applied and mmapped < MIB64 and heap >= MIB64  # from the heap, and the heap keeps it


def test_the_environment_switch_leaves_malloc_alone(monkeypatch):
    for value in ("0", "false", "Off"):
        monkeypatch.setenv(host_memory.ENV_SWITCH, value)
        assert host_memory.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_switch_off_leaves_large_blocks_mapped():
    applied, mmapped, heap = _child("keep", {host_memory.ENV_SWITCH: "0"})
    assert not applied and mmapped >= MIB64 and heap < MIB64


def test_lorakit_train_keeps_freed_memory(tmp_path, monkeypatch):
    from lorakit.cli import main

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or False)
    assert main(["train", "--max-steps", "1", "--no-progress", "--early-stop", "off", "--out",
                 str(tmp_path / "run")]) == 0
    assert calls == [1]


class _ModelLoadStopped(LorakitError):
    pass


def _stop_at_model_load(*args, **kwargs):
    raise _ModelLoadStopped("stopped where the model loads")


def test_lorakit_sample_keeps_freed_memory_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import lorakit.models
    from lorakit.cli import main

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or False)
    monkeypatch.setattr(lorakit.models, "load_base_model", _stop_at_model_load)
    assert main(["sample", "--prompt", "a star", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "stopped where the model loads" in capsys.readouterr().err
    assert calls == [1]


@pytest.mark.extended  # 27 s: the benchmark's own harness (pytest -m extended); the setting is tested above
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_benchmark_times_denoising_steps_both_ways():
    """benchmarks/host_memory_ab.py --job sample: one child process per setting, the setting applied in its own."""
    import os
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "host_memory_ab.py"
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_SWITCH}  # conftest sets it for tests
    done = subprocess.run([sys.executable, str(script), "--job", "sample", "--width", "half", "--resolution", "64",
                           "--steps", "1", "--repeats", "1"], capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "denoising steps, batch 2, no autograd" in out and "did not apply" not in out
    rows = [line for line in out.splitlines() if line.startswith(("| as it is", "| freed memory kept"))]
    assert len(rows) == 2
    kept = next(r for r in rows if r.startswith("| freed memory kept")).split("|")
    assert float(kept[3].split()[0]) > 0 and int(kept[4]) < 1000  # a time, and (next to) no page faults
