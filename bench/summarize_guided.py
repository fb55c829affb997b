"""Prints the guided-step benchmark results as Markdown tables (for bench/README.md).

    python bench/summarize_guided.py                                   # both default results files
    python bench/summarize_guided.py --cpu bench/results/guided-step-cpu.json --flops bench/results/guided-step-flops.json

- CPU wall clock ("torch path + batching", from ``pytest bench/test_guided_step_bench.py --benchmark-json=...``):
  one row per contender: median and fastest step, the ratio of medians to CFG only, the paired ratio (each round
  over a CFG-only step run just before it), the FLOP ratio of the same step, and the step's peak memory. The
  CFG row's paired ratio compares two identical pipelines: a noise indicator (1.00 on a quiet machine).
- FLOPs (``bench/guided_flops.py``): per model, TFLOP of one guided step per contender, relative to CFG only and
  to the theoretical minimum, and what fused does beyond the minimum, per module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarize import _machine_line  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_JSON = os.path.join(HERE, "results", "guided-step-cpu.json")
FLOPS_JSON = os.path.join(HERE, "results", "guided-step-flops.json")


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def cpu_table(data: dict, flops: dict | None = None) -> str:
    benches = [b for b in data["benchmarks"] if b.get("extra_info", {}).get("label")]
    if not benches:
        return "(no guided-step benchmarks in this file)"
    machine = data.get("machine_info", {})
    first = benches[0]["extra_info"]
    cfg = next((b for b in benches if b["extra_info"].get("impl") == "cfg"), None)
    cfg_median = cfg["stats"]["median"] if cfg else None
    m = first["model"]
    load = machine.get("loadavg_at_start"), machine.get("loadavg_at_end")
    lines = [
        f"CPU wall clock, **{first['label']}** (no GPU: `perturbed_attention` runs its torch path, not the Triton kernel).",
        f"Machine: {_machine_line(machine)}, diffusers {first.get('diffusers', '?')}"
        + (f", headpag {first['headpag']['commit']}{' (+ uncommitted changes)' if first['headpag'].get('dirty') else ''}"
           if "headpag" in first else "")
        + (f"; load average (1 min) {load[0][0]:.2f} at start, {load[1][0]:.2f} at end" if all(load) else ""),
        f"Model: SD3-shaped `SD3Transformer2DModel`, random weights, eval, fp32: {m['num_layers']} joint blocks x "
        f"{m['num_attention_heads']} heads x {m['attention_head_dim']}, {first['image_tokens']} image + "
        f"{first['text_tokens']} text tokens; CFG scale {first['guidance_scale']}, PAG scale {first['pag_scale']}. "
        f"One step = one pipeline call with `num_inference_steps=1`; {len(cfg['stats']['data']) if cfg else '?'} rounds each.",
        "",
        "| contender | heads (mode) | median ms/step | min ms | paired CFG ms | vs CFG (paired) | vs CFG (medians) | FLOPs vs CFG | step peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fallback = (flops or {}).get("cpu_bench_model", {}).get("ratios", {})
    used_fallback = False
    for b in benches:
        info = b["extra_info"]
        median = b["stats"]["median"]
        flop_ratio = _fmt(info.get("flop_ratio_to_cfg"), ".3f", "x")
        if "flop_ratio_to_cfg" not in info and info["impl"] in fallback:
            flop_ratio, used_fallback = f"{fallback[info['impl']]:.3f}x†", True
        heads = info.get("heads") or (",".join(f"{i}:*" for i in info.get("layers", [])) or "")
        heads = f"{heads} ({info['mode']})" if info.get("mode") and heads else "-"
        ratio = median / cfg_median if cfg_median else None
        peak = info.get("step_peak_mib")
        lines.append(
            "| " + " | ".join([
                f"{info['impl']}: {info['what']}", heads, f"{median * 1e3:.0f}", f"{b['stats']['min'] * 1e3:.0f}",
                _fmt(info.get("paired_cfg_median_ms"), ".0f"), _fmt(info.get("paired_ratio_to_cfg"), ".2f", "x"),
                _fmt(ratio, ".2f", "x"),
                flop_ratio,
                _fmt(peak, ".0f") if peak is not None else info.get("peak_mem", "n/a"),
            ]) + " |"
        )
    if used_fallback:
        src = flops.get("headpag", {}).get("commit", "?")
        lines += ["", f"† counted by bench/guided_flops.py (headpag {src}): this run could not count them "
                  f"({first.get('flops', 'no FLOPs recorded')[:160]})."]
    lines += ["", "Paired: each timed round is preceded by an (untimed) CFG-only step on an identical copy of the pipeline; "
              "\"paired CFG ms\" is their median and \"vs CFG (paired)\" the median of the per-round ratios, which holds "
              "up when other work on the machine comes and goes during the run. \"vs CFG (medians)\" divides by the "
              "CFG benchmark's own median, taken minutes apart: trust it only when the paired CFG ms agree across rows."]
    if cfg and "paired_ratio_to_cfg" in cfg["extra_info"]:
        lines += ["", f"Noise check: CFG only against an identical copy, paired: {cfg['extra_info']['paired_ratio_to_cfg']:.2f}x "
                  "(1.00x on a quiet machine; rerun when it is far off)."]
    return "\n".join(lines)


def flops_tables(data: dict) -> str:
    names = {"cfg_only": "CFG only", "minimum": "theoretical minimum", "fused": "headpag fused CFG+PAG",
             "eager": "headpag eager CFG+PAG", "diffusers_pag": "diffusers PAG pipeline (layer level, same layers)"}
    out = [f"FLOPs of one guided step on the meta device (`FlopCounterMode`), heads `{data['heads']}` "
           f"(u=1, joint mode), PAG scale {data['scale']}; torch {data['machine']['torch']}, diffusers {data['machine']['diffusers']}"
           + (f", headpag {data['headpag']['commit']}{' (+ uncommitted changes)' if data['headpag'].get('dirty') else ''}"
              if "headpag" in data else "") + "."]
    for r in data["results"]:
        base, minimum = r["flops"]["cfg_only"], r["flops"]["minimum"]
        rows = "2 rows [uncond, cond]" if r["n_base_rows"] == 2 else "1 row [cond] (distilled guidance)"
        out += [
            "",
            f"**{r['model']}** ({r['model_class']}, {r['tokens']['image']} image + {r['tokens']['text']} text tokens, "
            f"head dim {r['head_dim']}; base call {rows}; fork unit `{r['fork_unit']}`)",
            "",
            f"| contender | TFLOP | vs {'CFG only' if r['n_base_rows'] == 2 else 'guidance only'} | vs minimum |",
            "|---|---:|---:|---:|",
        ]
        for key in ("cfg_only", "minimum", "fused", "eager", "diffusers_pag"):
            if key in r["flops"]:
                f = r["flops"][key]
                name = names[key]
                if r["n_base_rows"] == 1:  # Flux: distilled guidance, no CFG rows
                    name = name.replace("CFG only", "guidance only (1 row)").replace("CFG+PAG", "PAG")
                out.append(f"| {name} | {f / 1e12:.2f} | {f / base:.4f}x | {f / minimum:.4f}x |")
        excess = r.get("fused_excess_over_minimum", {})
        if excess:
            parts = ", ".join(f"`{k}` {v / 1e9:.1f} GFLOP" for k, v in sorted(excess.items(), key=lambda kv: -kv[1]))
            out.append(f"\nFused beyond the minimum: {parts} (the twin row through the pre-loop embeddings, which "
                       f"headpag widens at the denoiser's entry).")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", default=CPU_JSON, help="pytest-benchmark JSON of test_guided_step_bench.py")
    parser.add_argument("--flops", default=FLOPS_JSON, help="JSON written by guided_flops.py")
    args = parser.parse_args(argv)
    loaded = {}
    for key, path in (("cpu", args.cpu), ("flops", args.flops)):
        if os.path.exists(path):
            with open(path) as f:
                loaded[key] = json.load(f)
    parts = [
        cpu_table(loaded["cpu"], loaded.get("flops")) if "cpu" in loaded else f"({args.cpu} not found)",
        flops_tables(loaded["flops"]) if "flops" in loaded else f"({args.flops} not found)",
    ]
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
