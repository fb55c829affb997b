"""``headpag bench``: the whole performance report in one command, as JSON and a Markdown table.

Sections (``SECTIONS``), run in this order:

- ``flops``: full-size cost per guided step on the meta device (``full_size.run``), with the H100 roofline
  projection of each count and HeadHunter's FLOPs per candidate;
- ``cpu``: CPU wall clock side by side in one run: one guided step of an SD3-shaped pipeline per contender, paired
  ratios to CFG only, median and spread over rounds, peak memory (``guided_step.run("cpu")``), and the kernel
  sweep's CPU cases (``kernel_sweep.run("cpu")``);
- ``refresh``: ``refresh = k`` (the guidance difference reused between refresh steps) per sampling run
  (``refresh.section``): FLOPs of a 28-step run at full size, CPU run times, the digits model's quality;
- ``gpu``: with CUDA, the kernel sweep's CUDA cases and the guided step on the small and the SD3-medium-sized model,
  the latter next to its roofline projection; without CUDA, skipped with the reason.

``quick`` is a smoke test of a minute or two: SD3-medium's FLOPs with one head set, and the CPU section on a small
image (``QUICK_CPU``: 8x8 latent, 2 rounds) and the kernel sweep's N=256 cases.

``pytest bench/ --benchmark-only`` runs the same suites (the same cases, checks and step functions) under
pytest-benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from . import SECTIONS, full_size, guided_step, kernel_sweep, refresh, roofline
from .machine import headpag_source, machine_info, use_pil_image_processors

JSON_NAME, MARKDOWN_NAME = "headpag-bench.json", "report.md"
DEFAULT_OUT = os.path.join("bench", "results")  # relative: under the current directory
# --quick's CPU section: the CPU setting on an 8x8 latent (16 image tokens), 2 timed rounds; kernels at N=256.
QUICK_CPU = dataclasses.replace(guided_step.SETTINGS["cpu"], name="cpu-quick", latent=8, rounds=2, warmup=1,
                                label="quick smoke test (8x8 latent, 2 rounds: not a measurement to quote); "
                                + guided_step.SETTINGS["cpu"].label)
QUICK_KERNEL_N, QUICK_KERNEL_ROUNDS = 256, 3
README_BEGIN, README_END = "<!-- headpag bench: begin -->", "<!-- headpag bench: end -->"


def check_sections(sections) -> tuple[str, ...]:
    sections = tuple(sections)
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise ValueError(f"sections must be a non-empty subset of {', '.join(SECTIONS)}; got {list(sections)}")
    return sections


def run_report(out_dir: str | os.PathLike = DEFAULT_OUT, sections=SECTIONS, quick: bool = False,
               rounds: int | None = None) -> dict:
    """Runs ``sections``, writes ``headpag-bench.json`` and ``report.md`` under ``out_dir`` and returns the report.
    A section that raises (a failed correctness check, a count that cannot be made) is recorded as
    ``{"error": ...}`` and listed in ``failed_sections``; the others still run.
    ``quick``: the FLOP section counts SD3-medium with one head set only, the CPU section runs ``QUICK_CPU`` and
    the N=256 kernel cases. ``rounds``: timed rounds per wall-clock benchmark (default: each suite's own)."""
    sections = check_sections(sections)
    if rounds is not None and rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    use_pil_image_processors()  # no torchvision notice from diffusers' pipeline imports
    start = time.perf_counter()
    report = dict(description=__doc__.split("\n\n")[0].strip(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  machine=machine_info(), headpag=headpag_source(), quick=quick, sections=list(sections))
    runners = dict(flops=lambda: full_size.run(quick=quick),
                   cpu=lambda: cpu_section(quick, rounds),
                   refresh=lambda: refresh.section(quick, QUICK_CPU),
                   gpu=lambda: gpu_section(rounds))
    for section in sections:
        try:
            report[section] = runners[section]()
        except Exception as err:  # noqa: BLE001  a failed check or count ends its section, not the report
            report[section] = dict(error=f"{type(err).__name__}: {err}")
    gpu_steps = report.get("gpu", {}).get("guided_step", {})
    report["failed_sections"] = [s for s in sections if "error" in report[s]
                                 or (s == "gpu" and any("error" in r for r in gpu_steps.values()))]
    report["load_average_at_end"] = machine_info()["load_average"]
    report["seconds"] = time.perf_counter() - start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(report, indent=1))
    (out / MARKDOWN_NAME).write_text(markdown(report))
    return report


def cpu_section(quick: bool = False, rounds: int | None = None) -> dict:
    """The guided step and the kernel sweep on the CPU (``quick``: the small setting and the N=256 cases)."""
    if not quick:
        return dict(guided_step=guided_step.run("cpu", rounds=rounds), kernels=kernel_sweep.run("cpu", rounds=rounds))
    cases = [c for c in kernel_sweep.cpu_cases() if c.N == QUICK_KERNEL_N]
    return dict(guided_step=guided_step.run(QUICK_CPU, rounds=rounds),
                kernels=kernel_sweep.run("cpu", cases=cases, rounds=rounds or QUICK_KERNEL_ROUNDS))


def gpu_section(rounds: int | None = None) -> dict:
    """The CUDA suites, or ``{"skipped": why}`` (each suite also says why it skipped)."""
    kernels = kernel_sweep.run("cuda", rounds=rounds)
    if "skipped" in kernels:
        return dict(skipped=kernels["skipped"])
    steps = {}
    for name in ("cuda-small", "cuda-sd3-medium"):
        try:
            steps[name] = guided_step.run(name, rounds=rounds)
        except Exception as err:  # noqa: BLE001  keep the kernel sweep and the other setting's results
            steps[name] = dict(setting=name, error=f"{type(err).__name__}: {err}")
    return dict(gpu=kernels["gpu"], kernels=kernels, guided_step=steps)


# ---------------------------------------------------------------------------------------------------- Markdown

def _f(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def flops_table(section: dict) -> list[str]:
    lines = ["## Full-size FLOPs per guided step (meta device)", "",
             f"FlopCounterMode on meta tensors, full-size configs, PAG scale {section['scale']}, mode joint, u=1. "
             "Fused target: within 2% of the theoretical minimum. H100 ms is a roofline **projection**, not a "
             "measurement.", "",
             "| model | head set | case | heads | fork unit | plain TFLOP | CFG-only TFLOP | eager TFLOP | fused TFLOP "
             "| minimum TFLOP | fused/minimum | fused/CFG-only | eager/fused | H100 ms CFG-only / fused (projection) |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in section["results"]:
        t, r, proj = e["tflop"], e["ratios"], e["roofline_h100_projection"]
        lines.append(f"| {e['model']} | {e['head_set']} | {e['case']} | {e['n_heads']} | {e['fork_unit']} | "
                     f"{t['plain']:.3f} | {t['cfg_only']:.3f} | {t['eager']:.3f} | {t['fused']:.3f} | {t['minimum']:.3f} | "
                     f"{r['fused/minimum']:.4f} | {r['fused/cfg_only']:.3f} | {r['eager/fused']:.3f} | "
                     f"{proj['cfg_only']['ms']:.1f} / {proj['fused']['ms']:.1f} ({proj['fused']['bound']}) |")
    largest = {}
    for e in section["results"]:
        for module, flops in e["fused_excess_over_minimum"].items():
            if flops > largest.get(e["model"], ("", 0))[1]:
                largest[e["model"]] = (module, flops)
    if largest:
        lines += ["", "Fused beyond the minimum, largest module per model: " + "; ".join(
            f"{model} `{module}` {flops / 1e9:.1f} GFLOP" for model, (module, flops) in largest.items())
            + " (the twin row through the modules before the first forward-loop unit, which headpag widens at the "
            "denoiser's entry)."]
    outside = [e for e in section["results"] if not e["within_2pct_of_minimum"]]
    lines += ["", "Every fused count is within 2% of the minimum." if not outside else
              "Beyond 2% of the minimum: " + "; ".join(f"{e['model']} {e['head_set']} {e['case']} "
                                                       f"{e['fused_excess_over_minimum']}" for e in outside)]
    hunt = section.get("hunt")
    if hunt:
        lines += ["", f"HeadHunter (SD3-medium 1024^2, CFG off): one candidate at a time costs "
                  f"{hunt['one_at_a_time / fused_batched']:.2f}x the FLOPs per candidate image and step of a batch "
                  f"of fused candidates ({hunt['note']})."]
    return lines


def step_table(result: dict, title: str) -> list[str]:
    if "skipped" in result:
        return [f"### {title}", "", result["skipped"]]
    if "error" in result:
        return [f"### {title}", "", f"**Failed**: {result['error']}"]
    model = result["model"]
    lines = [f"### {title}", "",
             f"{result['label']}. `SD3Transformer2DModel`, {model['num_layers']} joint blocks x "
             f"{model['num_attention_heads']} heads x {model['attention_head_dim']}, {result['image_tokens']} image + "
             f"{result['text_tokens']} text tokens, {result['dtype']}, random weights; CFG {result['guidance_scale']}, "
             f"PAG scale {result['pag_scale']}. A round is one pipeline call with one step; {result['rounds']} rounds "
             f"after {result['warmup']} warm-up; {result['threads']} torch threads.", ""]
    with_roofline = any("roofline_h100_projection" in r for r in result["contenders"].values())
    header = ["contender", "heads (mode)", "median ms", "min-max ms", "paired CFG ms", "vs CFG (paired, median [min-max])",
              "FLOPs vs CFG", "GFLOP/s", "step peak MiB"] + (["H100 ms (projection)"] if with_roofline else [])
    lines += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for name, r in result["contenders"].items():
        p = r["paired_ratio_to_cfg"]
        selected = r["heads"] or ("layers " + ",".join(map(str, r["layers"])) if r["layers"] else None)
        row = [f"{name}: {r['what']}", f"{selected} ({r['mode']})" if selected else "-", f"{r['median_ms']:.1f}",
               f"{r['min_ms']:.1f}-{r['max_ms']:.1f}", f"{r['paired_cfg_median_ms']:.1f}",
               f"{p['median']:.2f}x [{p['min']:.2f}-{p['max']:.2f}]", _f(r.get("flop_ratio_to_cfg"), ".3f") + "x",
               _f(r.get("gflop_per_s"), ".0f"),
               _f(r.get("step_peak_mib"), ".0f") or r.get("not_measured", "")]
        if with_roofline:
            row.append(_f(r.get("roofline_h100_projection", {}).get("ms"), ".1f"))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Noise check: CFG only against an identical copy, paired: {result['noise_check']['median']:.2f}x "
              "(1.00x on a quiet machine). Fused == eager (== diffusers PAG for layers) was checked before timing: "
              + ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_diffs"].items() if "_vs_cfg" not in k) + "."]
    return lines


def kernel_table(result: dict, title: str) -> list[str]:
    if "skipped" in result:
        return [f"### {title}", "", result["skipped"]]
    with_memory = any("peak_mem_over_inputs_mib" in r for r in result["results"])
    lines = [f"### {title}", "", "| problem | impl | median ms | min-max ms | vs baseline | throughput |"
             + (" peak MiB over inputs |" if with_memory else ""), "|---|---|---:|---:|---:|---:|" + ("---:|" if with_memory else "")]
    for r in result["results"]:
        ratio = r.get(f"ratio_to_{r['baseline']}")
        throughput = (f"{r['gbyte_per_s']:.0f} GB/s" if "gbyte_per_s" in r else
                      f"{r['tflop_per_s'] * 1e3:.1f} GFLOP/s" if "tflop_per_s" in r and r["device"] == "cpu" else
                      f"{r['tflop_per_s']:.1f} TFLOP/s" if "tflop_per_s" in r else "")
        lines.append(f"| {r['group']} | {r['impl']} | {r['median_ms']:.3f} | {r['min_ms']:.3f}-{r['max_ms']:.3f} | "
                     f"{_f(ratio, '.2f')}x {r['baseline']} | {throughput} |"
                     + (f" {_f(r.get('peak_mem_over_inputs_mib'), '.0f')} |" if with_memory else ""))
    for s in result.get("skipped_impls", []):
        lines.append(f"| {s['group']} | {s['impl']} | skipped: {s['why']} | | | |")
    return lines


def markdown(report: dict) -> str:
    m, src = report["machine"], report["headpag"]
    lines = ["# headpag bench", "",
             f"Measured {report['date']} on {m['cpu_model']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads), "
             f"GPU: {m['gpu'] or 'none'}; torch {m['torch']}, triton {m['triton']}, diffusers {m['diffusers']}, "
             f"headpag {src.get('commit')}{' (uncommitted changes)' if src.get('dirty') else ''}; load average "
             f"{_f((m['load_average'] or [None])[0], '.2f')} at start, "
             f"{_f((report.get('load_average_at_end') or [None])[0], '.2f')} at end; {report['seconds']:.0f} s in all.", ""]
    for section in report.get("failed_sections", []):
        why = report[section].get("error", "see its table below")
        lines += [f"**Section {section} failed**: {why}", ""]
    if "flops" in report and "error" not in report["flops"]:
        lines += flops_table(report["flops"]) + [""]
    if "cpu" in report and "error" not in report["cpu"]:
        lines += ["## CPU wall clock (side by side, one run)", ""]
        lines += step_table(report["cpu"]["guided_step"], "Guided step, SD3-shaped model") + [""]
        lines += kernel_table(report["cpu"]["kernels"], "Kernel sweep, CPU (torch path and oracle vs SDPA)") + [""]
    if "refresh" in report and "error" not in report["refresh"]:
        lines += refresh.markdown(report["refresh"]) + [""]
    if "gpu" in report and "error" not in report["gpu"]:
        gpu = report["gpu"]
        lines += ["## GPU", ""]
        if "skipped" in gpu:
            lines += [f"GPU suites {gpu['skipped']}.", ""]
        else:
            lines += [f"GPU: {gpu['gpu']}.", ""]
            lines += kernel_table(gpu["kernels"], "Kernel sweep, CUDA (Triton kernel vs SDPA / v.clone())") + [""]
            for name, result in gpu["guided_step"].items():
                lines += step_table(result, f"Guided step, {name}") + [""]
    lines += [f"Roofline: {roofline.NOTE}.", ""]
    return "\n".join(lines)


def check_readme(readme: str | os.PathLike) -> str:
    """The text of ``readme``; raises ``ValueError`` unless it holds ``README_BEGIN`` and then ``README_END``."""
    path = Path(readme)
    if not path.is_file():
        raise ValueError(f"readme must be an existing Markdown file, got {str(path)!r}")
    content = path.read_text()
    begin, end = content.find(README_BEGIN), content.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"readme {path} must hold the lines {README_BEGIN!r} and then {README_END!r}")
    return content


def embed_in_readme(readme: str | os.PathLike, text: str) -> None:
    """Replaces what lies between ``README_BEGIN`` and ``README_END`` in ``readme`` with ``text`` (headings two
    levels deeper, to sit under a README's ``##`` section); raises ``ValueError`` when the markers are missing."""
    content = check_readme(readme)
    begin, end = content.find(README_BEGIN), content.find(README_END)
    body = "\n".join("##" + line if line.startswith("#") else line for line in text.strip().splitlines())
    Path(readme).write_text(content[:begin + len(README_BEGIN)] + "\n" + body + "\n" + content[end:])


def main(out_dir=DEFAULT_OUT, sections=SECTIONS, quick: bool = False, rounds: int | None = None,
         readme: str | None = None) -> int:
    if readme is not None:
        check_readme(readme)  # before minutes of measuring, not after
    print(f"headpag bench{' --quick' if quick else ''}: sections {', '.join(sections)}; results go to "
          f"{Path(out_dir).resolve()}", flush=True)
    report = run_report(out_dir=out_dir, sections=sections, quick=quick, rounds=rounds)
    text = markdown(report)
    print(text)
    print(f"wrote {Path(out_dir) / JSON_NAME} and {Path(out_dir) / MARKDOWN_NAME}")
    if report["failed_sections"]:
        print(f"failed sections: {', '.join(report['failed_sections'])} (the README was not updated)")
        return 1
    if readme is not None:
        embed_in_readme(readme, text)
        print(f"updated the report in {readme}")
    return 0
