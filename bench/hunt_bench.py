"""HeadHunter speed: candidates per hour on this CPU, and the FLOP ratio at SD3-medium 1024^2 (meta device).

    python bench/hunt_bench.py                    # writes bench/results/hunt-cpu.json and prints a Markdown table

Side by side in one run, same prompts and seeds, on a small SD3-shaped random-weight pipeline (CFG off, as in
the paper's search):

- exact, batched: ``headpag.hunt`` with many (candidate, prompt, seed) jobs per pipeline call (fused twins);
- one at a time: ``execution="eager", batch_size=1``: one candidate image per call with a separate perturbed
  forward and materialised maps (the paper's way);
- halving: successive halving, batched (an approximation: work done and heads chosen are reported).

FLOPs (meta device, full-size SD3-medium at 1024^2, 4096 image + 333 text tokens, CFG off): per candidate image
and step, a batch of 24 candidates (one in each layer) with fused per-row head sets, against one candidate at a
time with a separate perturbed forward (the same FLOPs for every layer: the whole second forward).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import headpag
from headpag.apps.benchmarks.meta_flops import hunt_candidate_flops

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hunt-cpu.json")
PROMPTS = ["p0", "p1"]
SEEDS = (0, 1)
STEPS = 4


def small_sd3():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=16,
        pos_embed_max_size=16,
    ).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        scaling_factor=1.5, shift_factor=0.06).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_EMBEDS = {p: (torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(i)),
               torch.randn(1, 16, generator=torch.Generator().manual_seed(100 + i))) for i, p in enumerate(PROMPTS)}


def encode(texts):
    return {"prompt_embeds": torch.cat([_EMBEDS[t][0] for t in texts]),
            "pooled_prompt_embeds": torch.cat([_EMBEDS[t][1] for t in texts])}


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def wall_clock(batch_size: int = 16) -> dict:
    pipe = small_sd3()
    common = dict(seeds=SEEDS, k=2, rounds=1, num_inference_steps=STEPS, encode=encode,
                  pipeline_kwargs=dict(height=32, width=32), verbose=False)
    runs = {
        "exact, batched (fused)": dict(batch_size=batch_size),
        "one at a time (eager, separate perturbed pass)": dict(batch_size=1, execution="eager"),
        "halving, batched (fused)": dict(batch_size=batch_size, strategy="halving"),
    }
    out = {}
    for name, kw in runs.items():
        start = time.perf_counter()
        result = headpag.hunt(pipe, brightness, PROMPTS, **common, **kw)
        seconds = time.perf_counter() - start
        n = len(result.rounds[0].scores)  # every candidate scored in round 1 (halving: on a slice at least)
        out[name] = {
            "seconds": seconds, "candidates": n, "candidates_per_hour": n / seconds * 3600,
            "images_generated": result.images_generated, "work_fraction": result.work_fraction,
            "heads": str(result.heads),
        }
    exact = out["exact, batched (fused)"]
    for entry in out.values():
        entry["speedup_vs_one_at_a_time"] = entry["candidates_per_hour"] / out[
            "one at a time (eager, separate perturbed pass)"]["candidates_per_hour"]
        entry["same_heads_as_exact"] = entry["heads"] == exact["heads"]
    return out


def table(results: dict) -> str:
    lines = ["| search | candidates | seconds | candidates / hour | vs one at a time | images | same heads as exact |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in results["wall_clock"].items():
        lines.append(f"| {name} | {r['candidates']} | {r['seconds']:.1f} | {r['candidates_per_hour']:.0f} | "
                     f"{r['speedup_vs_one_at_a_time']:.2f}x | {r['images_generated']} | {r['same_heads_as_exact']} |")
    f = results["flops"]
    lines.append("")
    lines.append(f"FLOPs per candidate image and step at SD3-medium 1024^2, CFG off (meta device): one at a time "
                 f"{f['per_candidate_image_step_tflop']['one_at_a_time']:.2f} TFLOP, batched fused "
                 f"{f['per_candidate_image_step_tflop']['fused_batched']:.2f} TFLOP: "
                 f"**{f['one_at_a_time / fused_batched']:.2f}x** less work per candidate.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "setting": {"prompts": len(PROMPTS), "seeds": len(SEEDS), "steps": STEPS, "model": "SD3-shaped, 4 layers x 4 heads, "
                    "head dim 16, 16x16 latents (64 image tokens), 16 text tokens, fp32, random weights"},
        "wall_clock": wall_clock(),
        "flops": hunt_candidate_flops(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
