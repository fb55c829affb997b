"""The command line's host-memory setting: glibc's allocator keeps freed memory in the process.

With glibc's defaults, ``malloc`` serves a large block with a fresh ``mmap`` (or grows the heap) and hands freed
memory back to the OS, so the next large tensor faults its pages in again. On a CPU this makes a batch twice as
large cost more than twice as much: one forward of the embedded digits model over 160 rows took 58 ms where two of
80 rows took 45 ms (copies 10x, GELU 2.9x the 80-row time); with the two thresholds below set, 44 ms against 45 ms.
That is the batch a fused guided step runs (the rows and their twins), so ``headpag`` (demo, bench, hunt, generate)
sets the two thresholds at start, as PyTorch's CPU performance guide does by preloading a caching allocator. A
library caller sets them in its own process: ``MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432``.
The cost: the process keeps up to :data:`TRIM_THRESHOLD` of freed memory instead of returning it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import warnings

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Freed memory the process keeps before trimming its heap, bytes.
TRIM_THRESHOLD = 1 << 30
#: Blocks at least this large get their own mmap; glibc's largest value on 64-bit systems (32 MiB).
MMAP_THRESHOLD = 32 << 20
#: A user who set any of these chose the allocator's behaviour already; it is left alone (``GLIBC_TUNABLES`` only when
#: it tunes malloc, ``glibc.malloc.*``).
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")

#: What :func:`keep_freed_memory` did in this process (None: not called), for the benchmarks' machine info.
state: str | None = None


def keep_freed_memory() -> str:
    """Sets glibc's trim and mmap thresholds (:data:`TRIM_THRESHOLD`, :data:`MMAP_THRESHOLD`) for this process.

    Returns what was done: ``"set"``, ``"user setting"`` (see :data:`USER_SETTINGS`), ``"not glibc"`` (another C
    library: nothing to set) or ``"failed"`` (glibc refused a value, e.g. a 32-bit system's smaller mmap maximum: a
    warning says so, and the command runs on with glibc's defaults)."""
    global state
    state = _apply()
    return state


def _user_setting() -> bool:
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return True
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def _apply() -> str:
    if _user_setting():
        return "user setting"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for parameter, value in ((M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_MMAP_THRESHOLD, MMAP_THRESHOLD)):
        if mallopt(parameter, value) != 1:
            warnings.warn(f"glibc refused mallopt({parameter}, {value}); freed host memory goes back to the OS as by "
                          f"default (large CPU batches may run slower)", RuntimeWarning, stacklevel=3)
            return "failed"
    return "set"
