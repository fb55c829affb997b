"""Prints a pytest-benchmark JSON from bench/test_kernel_bench.py as a Markdown table.

    python bench/summarize.py bench/results/kernel-cpu.json

One row per benchmark, in run order: its group, the implementation, the median time per call, the ratio of
that median to the group's baseline (SDPA, or ``v.clone()`` for the CUDA identity case), and throughput where
recorded. Ratios are recomputed from the JSON's own medians; a CUDA round of ``calls_per_round`` calls is
divided back to one call. A last line reports how much identical baseline runs varied (machine noise).
"""

from __future__ import annotations

import argparse
import json
import sys


def _per_call_median_s(bench: dict) -> float:
    return bench["stats"]["median"] / bench.get("extra_info", {}).get("calls_per_round", 1)


def _throughput(info: dict) -> str:
    if "tflop_per_s" in info:
        return f"{info['tflop_per_s']:.1f} TFLOP/s"
    if "gbyte_per_s" in info:
        return f"{info['gbyte_per_s']:.0f} GB/s"
    if "gflop_per_s" in info:
        return f"{info['gflop_per_s']:.1f} GFLOP/s"
    return ""


def _machine_line(machine: dict) -> str:
    parts = [machine.get("cuda_device") or machine.get("cpu_model") or machine.get("cpu", {}).get("brand_raw", "")]
    if machine.get("cuda_device") is None and machine.get("torch_num_threads"):
        parts.append(f"{machine['torch_num_threads']} torch threads")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    if machine.get("triton"):
        parts.append(f"triton {machine['triton']}")
    return ", ".join(p for p in parts if p)


def table(data: dict) -> str:
    benches = data["benchmarks"]
    baselines = {}
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("impl") is not None and info.get("impl") == info.get("baseline"):
            baselines[b["group"]] = _per_call_median_s(b)
    has_peak = any("peak_mem_mib" in b.get("extra_info", {}) for b in benches)
    header = ["benchmark", "impl", "median ms", "vs baseline", "throughput"] + (["peak MiB"] if has_peak else [])
    lines = [
        f"Machine: {_machine_line(data.get('machine_info', {}))}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for b in benches:
        info = b.get("extra_info", {})
        median = _per_call_median_s(b)
        base = baselines.get(b["group"])
        ratio = f"{median / base:.2f}x {info.get('baseline', '')}".rstrip() if base else "n/a"
        row = [b["group"] or b["name"], info.get("impl", b["name"]), f"{median * 1e3:.3f}", ratio, _throughput(info)]
        if has_peak:
            row.append(f"{info['peak_mem_mib']:.0f}" if "peak_mem_mib" in info else "")
        lines.append("| " + " | ".join(row) + " |")
    spread = _baseline_spread(benches)
    if spread is not None:
        lines += ["", f"Noise check: the same baseline op on the same shape varies up to {spread:.2f}x across groups "
                  "(1.00x on a quiet machine; rerun when it is far above)."]
    return "\n".join(lines)


def _baseline_spread(benches: list) -> float | None:
    """Largest max/min ratio of baseline medians that time the same op on the same shape in different groups
    (the CPU suite runs SDPA on identical inputs for every case): a cheap indicator of machine noise."""
    by_shape: dict = {}
    for b in benches:
        info = b.get("extra_info", {})
        if info.get("impl") is None or info.get("impl") != info.get("baseline"):
            continue
        key = tuple(info.get(k) for k in ("device", "impl", "B", "H", "N", "D", "dtype"))
        by_shape.setdefault(key, []).append(_per_call_median_s(b))
    ratios = [max(m) / min(m) for m in by_shape.values() if len(m) > 1]
    return max(ratios) if ratios else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", help="a file written by pytest --benchmark-json")
    args = parser.parse_args(argv)
    with open(args.json_path) as f:
        data = json.load(f)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
