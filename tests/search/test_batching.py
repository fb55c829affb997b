"""HeadHunter's batch_size="auto" (headpag.search.batching): the live-bytes tracker against allocations of known
size, the row cost it derives from a probe, the rule that turns cost and memory into a batch size, and the hunt
on the digits model choosing a batch that holds many jobs on a CPU (the old rule gave 4)."""

from __future__ import annotations

import pytest
import torch

from headpag.search import batching
from headpag.search.batching import PeakBytes, RowCost, batch_size_for, measure_row_cost

F32 = 4


def test_peak_bytes_counts_live_tensors_created_inside():
    before = torch.ones(10_000)  # exists before: not counted
    with PeakBytes("cpu") as tracker:
        a = before * 2  # 40 kB
        b = a + 1  # 80 kB live
        del a  # 40 kB live
        c = b.view(100, 100)  # a view: no new storage
        b.add_(1)  # in place: no new storage
        d = torch.empty(5_000)  # 60 kB live
    assert tracker.peak == 2 * 10_000 * F32
    assert tracker.live == 10_000 * F32 + 5_000 * F32
    del b, c, d


def test_measure_row_cost_recovers_a_known_per_row_cost():
    per_row, fixed = 3_000, 7_000  # floats

    def probe(rows):
        work = torch.empty(fixed + per_row * rows)
        work.add_(1)

    cost = measure_row_cost(probe, torch.device("cpu"))
    assert cost.bytes_per_row == per_row * F32
    assert cost.fixed_bytes == fixed * F32
    assert cost.seconds_per_row_step > 0


@pytest.mark.parametrize("cost, free, steps, jobs, expected", [
    # memory: (0.5 * 1000 - 100) // 10 = 40 rows; time: 20 s / (0.001 s * 10 steps) = 2000 rows
    (RowCost(100, 10, 0.001), 1000, 10, 500, 40),
    # time: 20 s / (0.5 s * 4 steps) = 10 rows; memory allows 4e8
    (RowCost(0, 1, 0.5), 10**9, 4, 500, 10),
    # jobs bound both
    (RowCost(0, 1, 0.0), 10**9, 4, 37, 37),
    # nothing fits: still one row
    (RowCost(10**9, 10**9, 10.0), 1000, 20, 50, 1),
])
def test_batch_size_rule(cost, free, steps, jobs, expected):
    assert batching.CALL_SECONDS == 20.0 and batching.MEMORY_FRACTION == 0.5
    assert batch_size_for(cost, free, steps, jobs) == expected


def test_auto_batch_size_of_the_digits_hunt_on_cpu(tmp_path, capsys):
    """The digits model on a CPU: a round's 24 heads x 3 prompts fit in one call (measured per-row cost ~0.1 MiB,
    a few ms per step); the old rule put 4 jobs in a call. The hunt prints what it chose."""
    from headpag import hunt
    from headpag.apps.digits import DigitObjective, load_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = hunt(load_pipeline(), DigitObjective(), ["0", "1", "7"], k=1, rounds=1, num_inference_steps=4,
                      batch_size="auto", verbose=True)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("batch size auto:"))
    size = int(line.split()[3])
    assert size == 72, line  # 24 candidates x 3 prompts: one call for the whole round
    assert result.images_generated == 72
