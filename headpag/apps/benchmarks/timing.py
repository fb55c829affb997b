"""Timing rounds and their statistics, shared by every wall-clock suite of ``headpag bench``.

``time_rounds`` is what pytest-benchmark's ``pedantic`` does (untimed ``setup`` before each round, warm-up rounds,
one call per round), without pytest, so that the ``headpag bench`` command and ``pytest bench/`` time the same
steps the same way. On CUDA, pass ``sync=torch.cuda.synchronize``: it runs inside the timed region, so a round
is real GPU time.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_rounds(fn: Callable[[], object], rounds: int, warmup: int = 1, setup: Callable[[], object] | None = None,
                sync: Callable[[], object] | None = None, calls_per_round: int = 1) -> list[float]:
    """Seconds per call of ``rounds`` timed rounds of ``fn`` (each round: ``setup()`` untimed, then
    ``calls_per_round`` calls and ``sync()`` timed), after ``warmup`` untimed rounds."""
    if rounds < 1 or warmup < 0 or calls_per_round < 1:
        raise ValueError(f"need rounds >= 1, warmup >= 0, calls_per_round >= 1; got {rounds}, {warmup}, {calls_per_round}")
    times = []
    for i in range(warmup + rounds):
        if setup is not None:
            setup()
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        for _ in range(calls_per_round):
            fn()
        if sync is not None:
            sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) / calls_per_round)
    return times


def summary(times: list[float]) -> dict:
    """Median, min, max, interquartile range and relative spread ((max - min) / median) of ``times`` (seconds),
    in milliseconds."""
    if not times:
        raise ValueError("summary needs at least one time")
    ordered = sorted(times)
    median = statistics.median(ordered)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else (median, median, median)
    return dict(rounds=len(ordered), median_ms=median * 1e3, min_ms=ordered[0] * 1e3, max_ms=ordered[-1] * 1e3,
                iqr_ms=(q3 - q1) * 1e3, spread=(ordered[-1] - ordered[0]) / median if median else 0.0)


def ratio_summary(ratios: list[float]) -> dict:
    """Median, min and max of per-round ratios."""
    if not ratios:
        raise ValueError("ratio_summary needs at least one ratio")
    return dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
