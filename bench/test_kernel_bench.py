"""pytest-benchmark suites for ``headpag.kernels.perturbed_attention``.

Run by path (pyproject's ``testpaths`` only names tests/)::

    python -m pytest bench/ --benchmark-only --benchmark-json=bench/results/kernel-cpu.json

Two suites:

- CPU (always runs): the torch path (``backend="torch"``) against ``reference_attention`` (the materialised-map
  oracle) and ``F.scaled_dot_product_attention`` on the same inputs, at sizes that finish in seconds.
- CUDA (skipped without a GPU): the Triton kernel with ``u = 0`` against SDPA (TFLOP/s), and with ``u = 1``
  against ``v.clone()`` (GB/s), for N in (1024, 4096, 16384), D in (64, 128), fp16 and bf16.

Every benchmark belongs to a group (``benchmark.group``) whose baseline (SDPA, or the copy) is parametrized to
run first; ``extra_info`` records the ratio of its median to that baseline's median, throughput, and what the
numbers depend on. ``python bench/summarize.py <json>`` prints the results as a Markdown table.

CUDA timings: each timed round launches the op ``calls_per_round`` times and then calls
``torch.cuda.synchronize()``, so the round's time is real GPU time, and the synchronisation cost is spread over
enough calls (about 2 ms of work per round) to be negligible. The JSON ``stats`` are per round; the per-call
numbers are ``extra_info["median_ms_per_call"]`` (summarize.py divides by ``calls_per_round``). Inputs are
reused across calls, so small problems run out of L2 for every contender alike.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from headpag.kernels import HAS_TRITON, attention_flops, perturbed_attention, reference_attention

# --------------------------------------------------------------------------------------------------- helpers


def _median_s(benchmark, calls_per_round: int = 1) -> float | None:
    """Median seconds per call of the benchmark just run (``None`` under ``--benchmark-disable``)."""
    if benchmark.stats is None:
        return None
    return benchmark.stats.stats.median / calls_per_round


def _quick_median_s(fn, reps: int = 5, sync=None) -> float:
    """Median seconds of ``fn`` outside pytest-benchmark: the baseline fallback when its own test did not run
    in this session (``-k`` selection)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _record_ratio(benchmark, baseline_medians, group, impl, baseline, median_s, baseline_fn, sync=None):
    """Stores the baseline's median, or the ratio of this benchmark's median to it, in ``extra_info``."""
    if median_s is None:
        return
    benchmark.extra_info["median_ms_per_call"] = median_s * 1e3
    if impl == baseline:
        baseline_medians[group] = median_s
        benchmark.extra_info[f"ratio_to_{baseline}"] = 1.0
        return
    base = baseline_medians.get(group)
    if base is None:
        base = _quick_median_s(baseline_fn, sync=sync)
        benchmark.extra_info["baseline_measured_inline"] = True
    benchmark.extra_info[f"baseline_median_ms"] = base * 1e3
    benchmark.extra_info[f"ratio_to_{baseline}"] = median_s / base


def _qkv(B, H, N, D, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, dtype=dtype, device=device, generator=gen) for _ in range(3))


# ------------------------------------------------------------------------------------------------- CPU suite

CPU_B, CPU_H, CPU_D, CPU_DTYPE = 1, 8, 64, torch.float32
CPU_NS = (256, 1024)
CPU_N_TEXT = 77
_HALF = CPU_H // 2
# case -> u, the plan it implies (passed explicitly, as a hot path would), mode, n_text.
CPU_CASES = {
    "plain": dict(u=0.0, plan=0, mode="joint", n_text=0),
    "identity": dict(u=1.0, plan=2, mode="joint", n_text=0),
    "soft": dict(u=[0.5] * _HALF + [0.0] * (CPU_H - _HALF), plan=[1] * _HALF + [0] * (CPU_H - _HALF), mode="joint", n_text=0),
    "image-identity": dict(u=1.0, plan=2, mode="image", n_text=CPU_N_TEXT),
}
CPU_IMPLS = ("sdpa", "torch", "reference")  # the baseline first: the others' ratios read its median
CPU_PARAMS = [(case, N, impl) for case in CPU_CASES for N in CPU_NS for impl in CPU_IMPLS]
REFERENCE_ROUNDS = 3  # the materialised-map oracle is slow; a few rounds are enough to place it


def _cpu_fn(impl, q, k, v, spec):
    kw = dict(mode=spec["mode"], n_text=spec["n_text"], text_first=False)  # SD3 order: image tokens first
    if impl == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if impl == "torch":
        return lambda: perturbed_attention(q, k, v, spec["u"], plan=spec["plan"], backend="torch", **kw)
    return lambda: reference_attention(q, k, v, spec["u"], plan=spec["plan"], **kw)


def _cpu_flops(impl, spec, N) -> int | None:
    """Algorithmic FLOPs (kernels/flops.py) for SDPA and the torch path; none for the oracle, whose work is
    the materialised maps rather than matrix products worth counting."""
    if impl == "sdpa":
        return 4 * CPU_B * CPU_H * N * N * CPU_D
    if impl == "torch":
        plan = spec["plan"] if isinstance(spec["plan"], list) else [spec["plan"]] * CPU_H
        return attention_flops(plan * CPU_B, N, CPU_D, spec["mode"], spec["n_text"], "torch")
    return None


@pytest.mark.benchmark(min_rounds=5, max_time=0.5, warmup=True, warmup_iterations=1)
@pytest.mark.parametrize("case,N,impl", CPU_PARAMS, ids=[f"{c}-N{n}-{i}" for c, n, i in CPU_PARAMS])
def test_cpu_attention(benchmark, baseline_medians, case, N, impl):
    spec = CPU_CASES[case]
    q, k, v = _qkv(CPU_B, CPU_H, N, CPU_D, CPU_DTYPE, "cpu")
    fn = _cpu_fn(impl, q, k, v, spec)
    group = f"cpu {case} N={N}"
    benchmark.group = group
    benchmark.extra_info.update(
        device="cpu", case=case, impl=impl, baseline="sdpa", B=CPU_B, H=CPU_H, N=N, D=CPU_D,
        dtype=str(CPU_DTYPE).removeprefix("torch."), mode=spec["mode"], n_text=spec["n_text"], u=str(spec["u"]),
        plan=str(spec["plan"]), threads=torch.get_num_threads(),
    )
    if impl == "torch":  # a wrong result's speed means nothing: check against the oracle, untimed
        expected = _cpu_fn("reference", q, k, v, spec)()
        torch.testing.assert_close(fn(), expected, atol=1e-4, rtol=1e-4)

    if impl == "reference":
        benchmark.pedantic(fn, rounds=REFERENCE_ROUNDS, warmup_rounds=1, iterations=1)
    else:
        benchmark(fn)

    median_s = _median_s(benchmark)
    flops = _cpu_flops(impl, spec, N)
    if median_s is not None and flops:
        benchmark.extra_info["algorithmic_gflop"] = flops / 1e9
        benchmark.extra_info["gflop_per_s"] = flops / median_s / 1e9
    _record_ratio(benchmark, baseline_medians, group, impl, "sdpa", median_s, _cpu_fn("sdpa", q, k, v, spec))


# ------------------------------------------------------------------------------------------------ CUDA suite

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA benchmarks need a CUDA GPU (torch.cuda.is_available() is False); the CPU suite runs instead",
)

CUDA_B, CUDA_H = 1, 24
CUDA_NS = (1024, 4096, 16384)
CUDA_DS = (64, 128)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_ROUND_S = 2e-3  # target GPU time per timed round (amortises the synchronisation)
CUDA_BENCH_S = 0.5  # target total timed GPU time per benchmark
CUDA_CASES = {"plain": ("sdpa", "triton"), "identity": ("copy", "triton")}  # baseline first
CUDA_PARAMS = [
    (case, N, D, dtype, impl)
    for case, impls in CUDA_CASES.items()
    for N in CUDA_NS
    for D in CUDA_DS
    for dtype in CUDA_DTYPES
    for impl in impls
]


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cuda_fn(impl, case, q, k, v):
    if impl == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if impl == "copy":
        return v.clone
    u, plan = (0.0, 0) if case == "plain" else (1.0, 2)
    return lambda: perturbed_attention(q, k, v, u, layout="bhnd", backend="triton", plan=plan)


def _skip_reason_triton() -> str | None:
    if not HAS_TRITON:
        return "backend='triton' needs the triton package"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set (tests/conftest.py sets it): the kernel would be interpreted, not timed"
    return None


def _peak_memory(fn) -> tuple[int, int]:
    """(peak allocated bytes during one call, peak minus what was allocated before it)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak, peak - before


def _cuda_pedantic(benchmark, fn) -> int:
    """Times ``fn`` with a synchronisation at the end of every round; returns the calls per round."""
    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    single = min(_quick_median_s(fn, reps=3, sync=torch.cuda.synchronize) for _ in range(2))
    calls = max(1, min(200, math.ceil(CUDA_ROUND_S / max(single, 1e-7))))
    rounds = max(5, min(50, int(CUDA_BENCH_S / (calls * max(single, 1e-7)))))

    def target():
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(target, rounds=rounds, warmup_rounds=2, iterations=1)
    return calls


@requires_cuda
@pytest.mark.parametrize(
    "case,N,D,dtype,impl",
    CUDA_PARAMS,
    ids=[f"{c}-N{n}-D{d}-{_dtype_name(t)}-{i}" for c, n, d, t, i in CUDA_PARAMS],
)
def test_cuda_attention(benchmark, baseline_medians, case, N, D, dtype, impl):
    if impl == "triton" and (reason := _skip_reason_triton()):
        pytest.skip(reason)
    q, k, v = _qkv(CUDA_B, CUDA_H, N, D, dtype, "cuda")
    fn = _cuda_fn(impl, case, q, k, v)
    baseline = CUDA_CASES[case][0]
    group = f"cuda {case} N={N} D={D} {_dtype_name(dtype)}"
    benchmark.group = group
    benchmark.extra_info.update(
        device="cuda", gpu=torch.cuda.get_device_name(), case=case, impl=impl, baseline=baseline,
        B=CUDA_B, H=CUDA_H, N=N, D=D, dtype=_dtype_name(dtype), mode="joint", n_text=0,
        u=0.0 if case == "plain" else 1.0, plan=0 if case == "plain" else 2,
    )

    if impl == "triton":  # check the result before timing it
        expected = F.scaled_dot_product_attention(q, k, v) if case == "plain" else v
        tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.float16 else dict(atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(fn().float(), expected.float(), **tol)

    fn()  # autotune before measuring memory: the autotuner's trial launches would count
    peak, peak_extra = _peak_memory(fn)
    benchmark.extra_info["peak_mem_mib"] = peak / 2**20
    benchmark.extra_info["peak_mem_over_inputs_mib"] = peak_extra / 2**20

    calls = _cuda_pedantic(benchmark, fn)
    benchmark.extra_info["calls_per_round"] = calls
    median_s = _median_s(benchmark, calls)
    if median_s is not None:
        if case == "plain":
            flops = 4 * CUDA_B * CUDA_H * N * N * D
            if impl == "triton":
                assert attention_flops([0] * (CUDA_B * CUDA_H), N, D, "joint", 0, "triton") == flops
            benchmark.extra_info["tflop_per_s"] = flops / median_s / 1e12
        else:
            moved = 2 * v.numel() * v.element_size()  # read v, write the output: the least any copy moves
            benchmark.extra_info["gbyte_per_s"] = moved / median_s / 1e9
    _record_ratio(
        benchmark, baseline_medians, group, impl, baseline, median_s,
        _cuda_fn(baseline, case, q, k, v), sync=torch.cuda.synchronize,
    )
