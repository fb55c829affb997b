"""pytest-benchmark suite of ``headpag.kernels.perturbed_attention``: the cases of ``headpag.apps.benchmarks.kernel_sweep``
(what ``headpag bench`` runs), timed by pytest-benchmark.

    python -m pytest bench/test_kernel_bench.py --benchmark-only --benchmark-json=bench/results/kernel-cpu.json
    python bench/summarize.py bench/results/kernel-cpu.json

CPU cases always run; CUDA cases skip themselves without a GPU (or under ``TRITON_INTERPRET=1``). Each case's
baseline (SDPA, or ``v.clone()``) is parametrized first; ``extra_info`` holds the same record as ``headpag bench``
(median, spread, throughput, the check's max |diff|) plus the ratio to the baseline's median of this session. A CUDA
round runs ``calls_per_round`` calls and a synchronisation: JSON ``stats`` are per round, ``extra_info`` per call.
"""

from __future__ import annotations

import pytest

from headpag.apps.benchmarks import kernel_sweep

PARAMS = [(case, impl) for case in kernel_sweep.cpu_cases() + kernel_sweep.cuda_cases() for impl in case.impls]


@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c.group.replace(' ', '-')}-{i}" for c, i in PARAMS])
def test_attention(benchmark, baseline_medians, case, impl):
    if (why := kernel_sweep.skip_reason(case, impl)) is not None:
        pytest.skip(why)
    m = kernel_sweep.prepare(case, impl)  # checked against the oracle before it is timed
    benchmark.group = case.group
    info = benchmark.extra_info
    info.update(m.record)
    benchmark.pedantic(m.one_round, rounds=m.rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    info.update(m.result([t / m.calls for t in benchmark.stats.stats.data]))
    if impl == case.baseline:
        baseline_medians[case.group] = info["median_ms"]
    elif case.group not in baseline_medians:  # the baseline's own test did not run first (-k, reordering)
        baseline_medians[case.group] = kernel_sweep.measure(case, case.baseline)["median_ms"]
        info["baseline_measured_inline"] = True
    info[f"ratio_to_{case.baseline}"] = info["median_ms"] / baseline_medians[case.group]
