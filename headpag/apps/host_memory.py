"""The command line's host-memory setting: glibc's allocator keeps freed memory in the process.

With glibc's defaults, ``malloc`` serves a large block with a fresh ``mmap`` (or grows the heap) and hands freed
memory back to the OS, so the next large tensor faults its pages in again. On a CPU this makes a batch twice as
large cost more than twice as much: one forward of the embedded digits model over 160 rows took 58 ms where two of
80 rows took 45 ms (copies 10x, GELU 2.9x the 80-row time), and with both thresholds below 44 ms against 45 ms.
That is the batch a fused guided step runs (the rows and their twins), so ``headpag`` (demo, bench, hunt, generate)
sets the two thresholds at start, as PyTorch's CPU performance guide does by preloading a caching allocator. A
library caller sets them in its own process: ``MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Freed memory the process keeps before trimming its heap, bytes.
TRIM_THRESHOLD = 1 << 30
#: Blocks at least this large get their own mmap; glibc's largest value on 64-bit systems (32 MiB).
MMAP_THRESHOLD = 32 << 20
#: A user who set any of these chose the allocator's behaviour already; it is left alone.
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")

#: What :func:`keep_freed_memory` did in this process (None: not called), for the benchmarks' machine info.
state: str | None = None


def keep_freed_memory() -> str:
    """Sets glibc's trim and mmap thresholds (:data:`TRIM_THRESHOLD`, :data:`MMAP_THRESHOLD`) for this process.

    Returns what was done: ``"set"``, ``"user setting"`` (one of :data:`USER_SETTINGS` is in the environment) or
    ``"not glibc"`` (another C library: nothing to set)."""
    global state
    state = _apply()
    return state


def _apply() -> str:
    if any(name in os.environ for name in USER_SETTINGS):
        return "user setting"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    for parameter, value in ((M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_MMAP_THRESHOLD, MMAP_THRESHOLD)):
        if libc.mallopt(parameter, value) != 1:
            raise OSError(f"glibc mallopt({parameter}, {value}) failed")
    return "set"
