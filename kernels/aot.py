"""Compile check without a GPU: ``python -m headpag.kernels.aot``.

Compiles every launch configuration of the fused kernel (``configs.py``) for sm_80, sm_90, sm_100 and sm_120,
float16 and bfloat16, each head dim diffusers' models use, both modes and each attention-mask kind (none, per key,
per query-key pair) with ``triton.compile`` and ``GPUTarget``, then reads the results: shared memory from triton's
metadata, registers and spills from ``ptxas -v`` on the PTX, tensor-core instructions (HMMA; Hopper's HGMMA;
Blackwell's tcgen05 UTCHMMA) from ``nvdisasm`` on the cubin, and the asynchronous copies (``cp.async``) that show
the key loop is software-pipelined. Prints a table and exits non-zero if any config fails to compile, spills,
exceeds the target's shared memory or is not pipelined.

Runs in worker processes without ``TRITON_INTERPRET`` (``triton.compile`` refuses interpreted functions).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from .configs import ARCHS, COMPILED_HEAD_DIMS, KernelConfig, configs_for, padded_head_dim
from .constants import MODES

COMPILED_DTYPES = ("fp16", "bf16")  # triton's names of the element types compiled (validation.DTYPES: torch's)
# Largest dynamic shared memory one block may use (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) and B200 (sm_100)
# 227 KiB, RTX 50 / RTX PRO Blackwell (sm_120) 99 KiB (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448, 100: 232448, 120: 101376}
# The MMA a tile of 64 rows or more must use on these targets (smaller tiles fall back to HMMA): Hopper's warpgroup
# MMA, Blackwell's tcgen05.
EXPECTED_MMA = {90: "HGMMA", 100: "UTCHMMA"}


@dataclass(frozen=True)
class Job:
    arch: int
    dtype: str
    mode: str
    head_dim: int
    config: KernelConfig
    bias_kind: int = 0


#: The kernel's ``BIAS_KIND`` values by name (``triton_kernel.bias_kind``).
MASKS = {"none": 0, "key": 1, "pair": 2}


@dataclass
class Result:
    arch: int
    dtype: str
    mode: str
    head_dim: int
    block_d: int
    config: str
    mask: str = "none"
    ok: bool = False
    shared: int = -1
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    mma: int = -1
    mma_kind: str = ""
    async_copies: int = -1
    seconds: float = 0.0
    error: str = ""
    cached: bool = False

    @property
    def failures(self) -> list[str]:
        problems = []
        if not self.ok:
            problems.append(f"compile failed: {self.error}")
            return problems
        if self.spill_stores or self.spill_loads:
            problems.append(f"spills {self.spill_stores}/{self.spill_loads} bytes")
        if self.shared > SHARED_MEMORY_LIMIT[self.arch]:
            problems.append(f"shared memory {self.shared} > {SHARED_MEMORY_LIMIT[self.arch]}")
        if self.mma <= 0:
            problems.append("no tensor-core instructions")
        expected = EXPECTED_MMA.get(self.arch)
        if self.mma > 0 and expected and int(re.match(r"M(\d+)", self.config).group(1)) >= 64 and self.mma_kind != expected:
            problems.append(f"{self.mma_kind} where a {self.config.split('-')[0][1:]}-row tile on sm_{self.arch} uses {expected}")
        if self.async_copies <= 0:
            problems.append("key loop not software-pipelined (no cp.async in the PTX)")
        return problems


def all_jobs(archs=ARCHS, dtypes=COMPILED_DTYPES, modes=MODES, head_dims=COMPILED_HEAD_DIMS, masks=tuple(MASKS)) -> list[Job]:
    return [
        Job(arch, dtype, mode, head_dim, config, MASKS[mask])
        for arch in archs
        for dtype in dtypes
        for mode in modes
        for head_dim in head_dims
        for mask in masks
        for config in configs_for(arch, padded_head_dim(head_dim), mode, MASKS[mask])
    ]


def _nvidia_tool(name: str) -> str:
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    path = os.path.join(folder, name)
    if name == "ptxas-blackwell" and not os.path.exists(path):
        path = os.path.join(folder, "ptxas")  # older triton: its own ptxas reads its own PTX
    return path


def _ptxas_report(ptx: str) -> tuple[int, int, int]:
    """Registers, spill-store bytes and spill-load bytes that ``ptxas -v`` reports for the PTX."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [_nvidia_tool("ptxas-blackwell"), "-v", f"--gpu-name={target}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = proc.stdout + proc.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spills.group(1)), int(spills.group(2))


def mma_instructions(sass: str) -> tuple[int, str]:
    """``(count, kind)`` of the tensor-core instructions in SASS text: Blackwell's tcgen05 MMAs (``UTCHMMA`` for
    16-bit inputs), Hopper's warpgroup ``HGMMA`` or ``HMMA``; the first kind found in that order."""
    for pattern in (r"UTC\w*MMA", r"HGMMA", r"HMMA"):
        found = re.findall(rf"\b{pattern}\b", sass)
        if found:
            return len(found), "/".join(sorted(set(found)))
    return 0, ""


def _mma_count(cubin: bytes) -> tuple[int, str]:
    """Tensor-core instructions in the cubin's SASS (:func:`mma_instructions`)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    return mma_instructions(sass)


def _async_copies(ptx: str) -> int:
    """Asynchronous global-to-shared copies in the PTX: the loads the software pipeliner issues ahead."""
    return len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)\b", ptx))


def _signature(dtype: str, fn) -> dict[str, str]:
    constexprs = {"HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "IMAGE_MODE", "INPUT_PRECISION", "COUNT_VISITS",
                  "STRIDE_MULTIPLE", "BIAS_KIND"}
    pointers = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "O": f"*{dtype}", "U": "*fp32", "VISITS": "*i32",
                "BIAS": "*fp32"}
    sig = {}
    for name in fn.arg_names:
        if name in pointers:
            sig[name] = pointers[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(job: Job) -> Result:
    """Compiles one config in this (non-interpreted) process and measures it."""
    import triton
    from triton.backends.compiler import GPUTarget

    from .triton_kernel import _perturbed_attention_fwd as fn
    from .triton_kernel import stride_multiple

    block_d = padded_head_dim(job.head_dim)
    mask = next(name for name, kind in MASKS.items() if kind == job.bias_kind)
    result = Result(job.arch, job.dtype, job.mode, job.head_dim, block_d, str(job.config), mask)
    start = time.perf_counter()
    try:
        sig = _signature(job.dtype, fn)
        constexprs = {
            "HEAD_DIM": job.head_dim, "BLOCK_D": block_d, "BLOCK_M": job.config.BLOCK_M,
            "BLOCK_N": job.config.BLOCK_N, "IMAGE_MODE": job.mode == "image", "INPUT_PRECISION": "ieee",
            "COUNT_VISITS": False, "STRIDE_MULTIPLE": stride_multiple([job.head_dim]), "BIAS_KIND": job.bias_kind,
        }
        # What the JIT infers for aligned pointers, and for strides when the head dim is a multiple of 16; contiguous
        # inputs have strides that are multiples of the head dim (STRIDE_MULTIPLE above).
        aligned = [n for n, kind in sig.items() if kind.startswith("*")]
        if job.head_dim % 16 == 0:
            aligned += [n for n, kind in sig.items()
                        if n.startswith("stride_") and not n.startswith("stride_bias") and kind == "i32"]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", job.arch, 32),
            options={"num_warps": job.config.num_warps, "num_stages": job.config.num_stages},
        )
        result.shared = int(kernel.metadata.shared)
        result.registers, result.spill_stores, result.spill_loads = _ptxas_report(kernel.asm["ptx"])
        result.mma, result.mma_kind = _mma_count(kernel.asm["cubin"])
        result.async_copies = _async_copies(kernel.asm["ptx"])
        result.ok = True
    except Exception as err:  # reported in the table; the exit status says it failed
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"[:200]
    result.seconds = time.perf_counter() - start
    return result


def format_table(results: list[Result]) -> str:
    header = ("arch", "dtype", "mode", "mask", "D", "BLOCK_D", "config", "smem B", "regs", "spill st/ld", "MMA", "cp.async", "status")
    rows = [header]
    for r in results:
        status = "ok" if not r.failures else "; ".join(r.failures)
        rows.append((
            f"sm_{r.arch}", r.dtype, r.mode, r.mask, str(r.head_dim), str(r.block_d), r.config, str(r.shared),
            str(r.registers), f"{r.spill_stores}/{r.spill_loads}", f"{r.mma} {r.mma_kind}", str(r.async_copies), status,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_summary(results: list[Result]) -> str:
    """One row per (arch, mode, mask, padded head dim): configs, worst registers / spills / shared memory, MMA kind."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.arch, r.mode, MASKS[r.mask], r.block_d), []).append(r)
    lines = [
        "| arch | mode | mask | BLOCK_D | configs compiled (ok) | max regs | max spill B | max smem B | tensor cores | pipelined |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (arch, mode, bias_kind, block_d), rs in sorted(groups.items()):
        mask = next(name for name, kind in MASKS.items() if kind == bias_kind)
        ok = [r for r in rs if not r.failures]
        kinds = sorted({r.mma_kind for r in rs if r.mma_kind})
        lines.append(
            f"| sm_{arch} | {mode} | {mask} | {block_d} | {len(rs)} ({len(ok)}) | {max(r.registers for r in rs)} | "
            f"{max(r.spill_stores + r.spill_loads for r in rs)} | {max(r.shared for r in rs)} | {'/'.join(kinds)} | "
            f"{sum(r.async_copies > 0 for r in rs)}/{len(rs)} |"
        )
    return "\n".join(lines)


def cache_key(job: Job) -> str:
    """The name of ``job``'s cached result: a hash of everything its compilation reads, namely the job, the
    installed triton (its compiler and its ptxas / nvdisasm), the kernel source and the functions here that
    compile and measure."""
    import triton

    here = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256(repr((asdict(job), triton.__version__)).encode())
    with open(os.path.join(here, "triton_kernel.py"), "rb") as f:
        digest.update(f.read())
    for fn in (compile_one, _signature, _ptxas_report, mma_instructions, _mma_count, _async_copies, _nvidia_tool):
        digest.update(inspect.getsource(fn).encode())
    return digest.hexdigest()[:32]


def run(jobs: list[Job], workers: int, cache: str | None = None) -> list[Result]:
    """Compiles ``jobs`` in ``workers`` processes. With a ``cache`` folder, a job whose :func:`cache_key` has a
    result there is read back instead of compiled, and each new result is written there as it arrives."""
    keys = [cache_key(job) for job in jobs] if cache else []
    results: dict[int, Result] = {}
    if cache:
        os.makedirs(cache, exist_ok=True)
        for i, key in enumerate(keys):
            path = os.path.join(cache, f"{key}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results[i] = Result(**json.load(f) | {"cached": True})
    todo = [i for i in range(len(jobs)) if i not in results]
    env_before = os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated so it does not warn
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for i, result in zip(todo, pool.map(compile_one, [jobs[i] for i in todo])):
                results[i] = result
                if cache:
                    with open(os.path.join(cache, f"{keys[i]}.json"), "w") as f:
                        json.dump(asdict(result), f)
    finally:
        if env_before is not None:
            os.environ["TRITON_INTERPRET"] = env_before
    return [results[i] for i in range(len(jobs))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m headpag.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS, help="compute capabilities")
    parser.add_argument("--dtype", nargs="+", default=list(COMPILED_DTYPES), choices=COMPILED_DTYPES)
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--mask", nargs="+", default=list(MASKS), choices=list(MASKS), help="attention-mask kinds")
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(COMPILED_HEAD_DIMS), help="head dims to compile")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--cache", metavar="DIR", help="reuse the results stored in DIR by an earlier run with the same "
                        "triton, kernel source and config (and store the new ones there)")
    args = parser.parse_args(argv)
    for d in args.head_dim:
        padded_head_dim(d)

    jobs = all_jobs(args.arch, args.dtype, args.mode, args.head_dim, args.mask)
    start = time.perf_counter()
    results = run(jobs, args.workers, args.cache)
    elapsed = time.perf_counter() - start
    print(format_table(results))
    print()
    print(format_summary(results))
    failed = [r for r in results if r.failures]
    print(
        f"\n{len(results)} configs compiled in {elapsed:.0f} s with {args.workers} workers"
        f"{f' ({sum(r.cached for r in results)} read from the cache)' if args.cache else ''}: "
        f"{len(results) - len(failed)} ok, {len(failed)} failed; max registers "
        f"{max((r.registers for r in results), default=0)}, max shared memory {max((r.shared for r in results), default=0)} B"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"failures": r.failures} for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
