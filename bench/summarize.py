"""Prints pytest-benchmark JSON of the bench/ suites as the Markdown tables ``headpag bench`` writes.

    python bench/summarize.py bench/results/kernel-cpu.json [more.json ...]

Kernel benchmarks (test_kernel_bench.py) become one table, guided-step benchmarks (test_guided_step_bench.py) one
table per setting, the FLOP benchmark (test_flops_bench.py) the full-size FLOP table; all from ``extra_info``, which
holds the same records as headpag-bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from headpag.apps.benchmarks import report


def _load(averages) -> str:
    return f"{averages[0]:.2f}" if averages else "?"


def tables(data: dict) -> str:
    m = data.get("machine_info", {})
    lines = [f"Machine: {m.get('cpu_model')} ({m.get('torch_threads')} torch threads), GPU: {m.get('gpu') or 'none'}, "
             f"torch {m.get('torch')}, triton {m.get('triton')}, diffusers {m.get('diffusers')}; load average "
             f"{_load(m.get('loadavg_at_start'))} at start, {_load(m.get('loadavg_at_end'))} at end.", ""]
    kernels, steps = [], defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "report" in info:
            lines += report.flops_table(info["report"]) + [""]
        elif "setting" in info and "median_ms" in info:
            steps[info["setting"]][info["impl"]] = info
        elif "group" in info and "median_ms" in info:
            kernels.append(info)
    if kernels:
        lines += report.kernel_table({"results": kernels}, "Kernel sweep") + [""]
    for setting, contenders in steps.items():
        first = next(iter(contenders.values()))
        result = dict(first, contenders=contenders, threads=m.get("torch_threads"), rounds=first["rounds"],
                      warmup="pytest-benchmark's", noise_check=contenders.get("cfg", first)["paired_ratio_to_cfg"])
        lines += report.step_table(result, f"Guided step, {setting}") + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    args = parser.parse_args(argv)
    for path in args.json:
        with open(path) as f:
            print(tables(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
