"""HeadHunter's ``batch_size="auto"``: jobs per pipeline call from the model's measured per-row cost and the
device's memory, the same rule on CPU and GPU.

A probe runs the guided pipeline for one step with 1 and with ``PROBE_ROWS`` jobs and measures the peak bytes of
live tensors each call creates on the device (:class:`PeakBytes`); the difference gives the bytes of one more row,
the 1-job call the fixed part. The ``PROBE_ROWS`` call's best-of-``TIME_REPEATS`` wall time over its rows gives the
seconds per row and step (an upper bound of the marginal cost: it includes the call's fixed overhead, and a
best-of is robust to a busy machine). Then

    by memory:  rows = (MEMORY_FRACTION * available bytes - fixed bytes) / bytes per row
    by time:    rows = CALL_SECONDS / (seconds per row and step * steps)      (a call stays short, so a stopped
                                                                              search loses little unrecorded work)
    batch size = clamp(min(by memory, by time), 1, jobs)

Available bytes: free CUDA memory (``torch.cuda.mem_get_info``) on a CUDA device, else the host's available memory
(``MemAvailable`` in ``/proc/meminfo``; on systems without it, physical memory / 2).
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PROBE_ROWS = 8  # the larger probe call; the smaller has one row
TIME_REPEATS = 3  # timed repeats of the larger probe call (the best counts)
MEMORY_FRACTION = 0.5  # of the available memory, for the rows of one call
CALL_SECONDS = 20.0  # target wall time of one pipeline call


class PeakBytes(TorchDispatchMode):
    """Peak bytes of live tensors created on ``device`` while the mode is active (the inputs and weights that
    already existed are not counted). A tensor's storage counts once (views and in-place results add nothing)
    and stops counting when the tensor that created it is freed."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.live = self.peak = 0
        self._storages: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != self.device.type:
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._storages:
                continue
            self._storages.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key, nbytes)
        return out


@dataclass
class RowCost:
    """What one probe measured: bytes of the 1-row call, bytes per further row, seconds per row and step."""

    fixed_bytes: int
    bytes_per_row: int
    seconds_per_row_step: float


def measure_row_cost(probe: Callable[[int], None], device: torch.device) -> RowCost:
    """Runs ``probe(rows)`` (a one-step guided call with ``rows`` jobs) after a 1-row warm-up: with 1 and
    ``PROBE_ROWS`` rows under :class:`PeakBytes`, then ``TIME_REPEATS`` timed ``PROBE_ROWS`` calls. Bytes per row
    are never below 1."""
    probe(1)  # first-call overheads (allocator, kernels, caches)
    peaks = {}
    for rows in (1, PROBE_ROWS):
        with PeakBytes(device) as tracker:
            probe(rows)
        peaks[rows] = tracker.peak
    best = float("inf")
    for _ in range(TIME_REPEATS):
        start = time.perf_counter()
        probe(PROBE_ROWS)
        best = min(best, time.perf_counter() - start)
    per_row = max(1, (peaks[PROBE_ROWS] - peaks[1]) // (PROBE_ROWS - 1))
    return RowCost(max(0, peaks[1] - per_row), per_row, best / PROBE_ROWS)


def available_bytes(device: torch.device) -> int:
    """Memory a call on ``device`` may use: free CUDA memory, else the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def batch_size_for(cost: RowCost, free_bytes: int, steps: int, n_jobs: int) -> int:
    """Jobs per call for ``cost`` (module docstring's rule), between 1 and ``n_jobs``."""
    by_memory = (MEMORY_FRACTION * free_bytes - cost.fixed_bytes) // cost.bytes_per_row
    per_row_call = cost.seconds_per_row_step * steps
    by_time = CALL_SECONDS / per_row_call if per_row_call > 0 else float("inf")
    return int(max(1, min(n_jobs, by_memory, by_time)))


def auto_batch_size(probe: Callable[[int], None], device: torch.device, steps: int, n_jobs: int) -> tuple[int, RowCost]:
    """``(batch size, measured cost)`` for ``n_jobs`` jobs of ``steps`` steps each (see the module docstring)."""
    if n_jobs <= 1:
        return max(1, n_jobs), RowCost(0, 1, 0.0)
    cost = measure_row_cost(probe, device)
    return batch_size_for(cost, available_bytes(device), steps, n_jobs), cost
