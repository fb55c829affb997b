"""The full-size FLOP section of ``headpag bench`` as a one-round benchmark (its time is the counting's time).

    python -m pytest bench/test_flops_bench.py --benchmark-only --benchmark-json=bench/results/flops.json

``extra_info["report"]`` holds the section as ``headpag bench`` writes it; the test fails where fused is more than 2%
above the theoretical minimum or not cheaper than eager.
"""

from __future__ import annotations

from headpag.apps.benchmarks import full_size


def test_full_size_flops(benchmark):
    section = benchmark.pedantic(full_size.run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["report"] = section
    assert section["results"]
    for entry in section["results"]:
        where = (entry["model"], entry["head_set"], entry["case"], entry["fused_excess_over_minimum"])
        assert entry["ratios"]["fused/minimum"] <= 1.02, where
        assert entry["flops"]["fused"] < entry["flops"]["eager"], where
