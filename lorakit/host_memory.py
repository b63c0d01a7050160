"""Keep the memory a process frees for its own reuse (Linux, glibc).

A training step allocates and frees the same large activation buffers every step. glibc's malloc serves each
block above its mmap threshold with a fresh ``mmap`` and unmaps it on ``free``, and trims the top of its heap,
so on the CPU every step pays page faults for memory it had a moment ago (the kernel zeroes each new page).
Measured on SD1.5's U-Net at 256² on one thread (`benchmarks/host_memory_ab.py`): a fifth of the frozen
model's step was system time spent on those faults, and a quarter of a LoCon step, whose adapters keep more
inputs alive for their gradients. ``keep_freed_memory`` turns both off for the process (``M_MMAP_MAX = 0``:
no ``mmap`` for allocations; ``M_TRIM_THRESHOLD = -1``: never trim), so freed blocks are reused. The price:
the resident size stays at its peak instead of shrinking between steps (a training process reaches that peak
every step anyway). Files mapped by safetensors are not allocations and are not affected. A denoising step
does the same, so ``lorakit sample`` and ``eval`` call it too (6-17 % faster at 256²-512², the same benchmark's
``--job sample``).

``LORAKIT_KEEP_FREED_MEMORY=0`` in the environment leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

ENV_SWITCH = "LORAKIT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep and reuse freed memory for the rest of the process; whether it was done
    (False off Linux, on another C library, or when ``LORAKIT_KEEP_FREED_MEMORY`` is 0/false/no/off)."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library the process already runs on
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc: musl's mallopt, for one, does nothing
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 as the trim threshold disables trimming (mallopt(3)); both return 1 on success
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
