"""Kernel sweep: ``headpag.kernels.perturbed_attention`` against SDPA (or a copy of V) on one device.

- CPU (every machine): B=1, H=8, D=64, fp32, N in (256, 1024); the torch path (``backend="torch"``) and the
  materialised-map oracle ``reference_attention`` against ``F.scaled_dot_product_attention``.
- CUDA (skipped without a GPU): B=1, H=24, N in (1024, 4096, 16384), D in (64, 128), fp16 and bf16; the Triton
  kernel (``backend="triton"``) against SDPA, and for joint identity (u=1) against ``v.clone()``.

Cases (``u`` as Python numbers and the host plan it implies, passed explicitly as a hot path would: neither makes
the host wait for the device): ``plain`` (u=0),
``identity`` (u=1, joint mode: no attention at all), ``soft`` (SoftPAG u=0.5 on half the heads, 0 on the rest),
``image-identity`` (image mode, u=1, 77 text tokens after the image tokens: SD3's order). Each case's first impl is
its baseline; the others report the ratio of their median to the baseline's median, measured in the same run.

Every timed op is checked first (the torch path and the kernel against the oracle; a wrong result's speed means
nothing). CUDA rounds run ``calls_per_round`` calls and then ``torch.cuda.synchronize()`` (about 2 ms of GPU work a
round), so a round is real GPU time; times are per call. Inputs are reused across calls.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from headpag.kernels import HAS_TRITON, attention_flops, perturbed_attention, reference_attention

from . import timing
from .machine import gpu_name

N_TEXT = 77
CUDA_ROUND_S = 2e-3  # target GPU time per timed round (amortises the synchronisation)
CUDA_BENCH_S = 0.5  # target timed GPU time per benchmark


@dataclass(frozen=True)
class Case:
    """One problem: ``case`` names u/plan/mode (``CASES``); ``impls`` are timed on it, the baseline first."""

    case: str
    device: str
    B: int
    H: int
    N: int
    D: int
    dtype: torch.dtype
    impls: tuple[str, ...]
    n_text: int = N_TEXT  # text tokens of image mode

    @property
    def group(self) -> str:
        return f"{self.device} {self.case} N={self.N} D={self.D} {dtype_name(self.dtype)}"

    @property
    def baseline(self) -> str:
        return self.impls[0]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def case_spec(case: Case) -> dict:
    """u, plan, mode and n_text of a case."""
    H = case.H
    half = H // 2
    return {
        "plain": dict(u=0.0, plan=0, mode="joint", n_text=0),
        "identity": dict(u=1.0, plan=2, mode="joint", n_text=0),
        "soft": dict(u=[0.5] * half + [0.0] * (H - half), plan=[1] * half + [0] * (H - half), mode="joint", n_text=0),
        "image-identity": dict(u=1.0, plan=2, mode="image", n_text=case.n_text),
    }[case.case]


CASES = ("plain", "identity", "soft", "image-identity")


def cpu_cases() -> list[Case]:
    return [Case(c, "cpu", 1, 8, n, 64, torch.float32, ("sdpa", "torch", "reference")) for c in CASES for n in (256, 1024)]


def cuda_cases() -> list[Case]:
    return [Case(c, "cuda", 1, 24, n, d, dtype, ("copy" if c == "identity" else "sdpa", "triton"))
            for c in CASES for n in (1024, 4096, 16384) for d in (64, 128) for dtype in (torch.float16, torch.bfloat16)]


def inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of shape (B, H, N, D) on the case's device."""
    gen = torch.Generator(device=case.device).manual_seed(seed)
    return tuple(torch.randn(case.B, case.H, case.N, case.D, dtype=case.dtype, device=case.device, generator=gen)
                 for _ in range(3))


def op(case: Case, impl: str, q, k, v):
    """The zero-argument call that ``impl`` times on ``case``."""
    spec = case_spec(case)
    kw = dict(layout="bhnd", mode=spec["mode"], n_text=spec["n_text"], text_first=False, plan=spec["plan"])
    if impl == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if impl == "copy":
        return v.clone
    if impl in ("torch", "triton"):
        return lambda: perturbed_attention(q, k, v, spec["u"], backend=impl, **kw)
    if impl == "reference":
        return lambda: reference_attention(q, k, v, spec["u"], **kw)
    raise ValueError(f"impl must be one of sdpa, copy, torch, triton, reference; got {impl!r}")


TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
             torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def oracle(case: Case, q, k, v) -> torch.Tensor:
    """``reference_attention`` in fp32, one head at a time (its N x N maps of all heads at N=16384 would not fit)."""
    spec = case_spec(case)
    kw = dict(layout="bhnd", mode=spec["mode"], n_text=spec["n_text"], text_first=False)
    per_head = lambda x, h: x[h] if isinstance(x, list) else x  # noqa: E731
    return torch.cat([reference_attention(q[:, h:h + 1].float(), k[:, h:h + 1].float(), v[:, h:h + 1].float(),
                                          per_head(spec["u"], h), plan=per_head(spec["plan"], h), **kw)
                      for h in range(case.H)], dim=1)


def check(case: Case, impl: str, q, k, v) -> float | None:
    """Max |diff| of ``impl`` against the oracle (fp32 reference); raises ``AssertionError`` beyond the dtype's
    tolerance. Baselines and the oracle itself are not checked (``None``)."""
    if impl not in ("torch", "triton"):
        return None
    expected = oracle(case, q, k, v)
    got = op(case, impl, q, k, v)().float()
    torch.testing.assert_close(got, expected, **TOLERANCE[case.dtype], msg=lambda m: f"{case.group} {impl}: {m}")
    return float((got - expected).abs().max())


def algorithmic_flops(case: Case, impl: str) -> int | None:
    """FLOPs of the attention products (kernels/flops.py); none for the copy and the oracle."""
    if impl == "sdpa":
        return 4 * case.B * case.H * case.N * case.N * case.D
    if impl in ("torch", "triton"):
        spec = case_spec(case)
        plan = spec["plan"] if isinstance(spec["plan"], list) else [spec["plan"]] * case.H
        return attention_flops(plan * case.B, case.N, case.D, spec["mode"], spec["n_text"], impl)
    return None


def skip_reason(case: Case, impl: str) -> str | None:
    """Why ``impl`` cannot be timed on ``case`` here, or ``None``."""
    if case.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if impl == "triton" and not HAS_TRITON:
        return "backend='triton' needs the triton package"
    if impl == "triton" and case.device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: the kernel would be interpreted, not timed"
    return None


def rounds_for(fn, case: Case) -> tuple[int, int]:
    """(rounds, calls per round): CPU 5 x 1 (3 for the slow oracle is the caller's choice); CUDA sized so that a
    round holds about ``CUDA_ROUND_S`` of GPU work and the benchmark about ``CUDA_BENCH_S``."""
    if case.device != "cuda":
        return 5, 1
    fn()
    single = min(timing.time_rounds(fn, rounds=3, warmup=0, sync=torch.cuda.synchronize))
    calls = max(1, min(200, math.ceil(CUDA_ROUND_S / max(single, 1e-7))))
    return max(5, min(50, int(CUDA_BENCH_S / (calls * max(single, 1e-7))))), calls


def peak_memory_mib(fn) -> float:
    """Peak CUDA memory of one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@dataclass
class Measurement:
    """One impl on one case, checked and ready to time: ``record`` (the case, the check's max |diff|, CUDA peak
    memory), the call ``fn``, and ``rounds`` timed rounds of ``calls`` calls each."""

    case: Case
    impl: str
    record: dict
    fn: Callable
    rounds: int
    calls: int

    def one_round(self) -> None:
        """``calls`` calls, then (CUDA) a synchronisation: what one timed round runs."""
        for _ in range(self.calls):
            self.fn()
        if self.case.device == "cuda":
            torch.cuda.synchronize()

    def result(self, seconds_per_call: list[float]) -> dict:
        """The JSON-ready record with the timing statistics (no ratio: see ``run``)."""
        return dict(self.record, **timed(self.case, self.impl, seconds_per_call, self.calls))


def prepare(case: Case, impl: str, rounds: int | None = None) -> Measurement:
    """Checks one impl on one case against the oracle and sizes its rounds."""
    q, k, v = inputs(case)
    fn = op(case, impl, q, k, v)
    record = dict(group=case.group, case=case.case, impl=impl, baseline=case.baseline, device=case.device,
                  B=case.B, H=case.H, N=case.N, D=case.D, dtype=dtype_name(case.dtype))
    record["max_abs_diff_vs_reference"] = check(case, impl, q, k, v)
    auto_rounds, calls = rounds_for(fn, case)
    if rounds is None:
        rounds = 3 if impl == "reference" else auto_rounds
    if case.device == "cuda":
        fn()  # autotune before measuring memory: the autotuner's trial launches would count
        record["peak_mem_over_inputs_mib"] = peak_memory_mib(fn)
    return Measurement(case, impl, record, fn, rounds, calls)


def measure(case: Case, impl: str, rounds: int | None = None) -> dict:
    """Checks, then times one impl on one case; a JSON-ready record (no ratio: see ``run``)."""
    m = prepare(case, impl, rounds)
    sync = torch.cuda.synchronize if case.device == "cuda" else None
    return m.result(timing.time_rounds(m.fn, rounds=m.rounds, warmup=1, sync=sync, calls_per_round=m.calls))


def timed(case: Case, impl: str, times: list[float], calls: int) -> dict:
    """Statistics of seconds-per-call ``times`` and the throughput they imply."""
    out = dict(timing.summary(times), calls_per_round=calls)
    seconds = out["median_ms"] / 1e3
    if (flops := algorithmic_flops(case, impl)):
        out["algorithmic_gflop"] = flops / 1e9
        out["tflop_per_s"] = flops / seconds / 1e12
    if case.case == "identity" and impl in ("copy", "triton"):
        v_bytes = case.B * case.H * case.N * case.D * torch.empty((), dtype=case.dtype).element_size()
        out["gbyte_per_s"] = 2 * v_bytes / seconds / 1e9  # read v, write the output: the least any copy moves
    return out


def run(device: str, cases: list[Case] | None = None, rounds: int | None = None) -> dict:
    """Every impl of every case on ``device`` ("cpu" or "cuda"), with ratios to each case's baseline measured in the
    same run; ``{"skipped": why}`` without the device."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    cases = (cpu_cases() if device == "cpu" else cuda_cases()) if cases is None else cases
    if device == "cuda" and not torch.cuda.is_available():
        return dict(device=device, skipped="skipped: no CUDA device (torch.cuda.is_available() is False)")
    records, skipped_impls = [], []
    for case in cases:
        base = None
        for impl in case.impls:
            if (why := skip_reason(case, impl)) is not None:
                skipped_impls.append(dict(group=case.group, impl=impl, why=why))
                continue
            record = measure(case, impl, rounds)
            if impl == case.baseline:
                base = record["median_ms"]
            if base is not None:
                record[f"ratio_to_{case.baseline}"] = record["median_ms"] / base
            records.append(record)
    return dict(device=device, gpu=gpu_name() if device == "cuda" else None, threads=torch.get_num_threads(),
                results=records, skipped_impls=skipped_impls)
