"""pytest-benchmark suite: one guided denoiser step of a diffusers pipeline, headpag against its baselines.

Run by path (pyproject's ``testpaths`` only names tests/; do not share a session with tests/)::

    python -m pytest bench/test_guided_step_bench.py --benchmark-json=bench/results/guided-step-cpu.json
    python bench/summarize_guided.py            # Markdown tables of both results files

Without ``--benchmark-only`` the FLOP test runs too: it writes ``bench/results/guided-step-flops.json``
(``bench/guided_flops.py``, full-size SD3-medium and FLUX.1-dev on the meta device, ~20 s).

CPU wall clock, labelled **"torch path + batching"**: with no GPU, ``perturbed_attention`` runs its torch path
(the Triton kernel needs a GPU), so these numbers show what the batching (fork, twin rows) and the identity
shortcut buy; they say nothing about the kernel. The model is an SD3-shaped ``StableDiffusion3Pipeline`` with
random weights (eval mode, fp32): 8 joint blocks, 6 heads of dim 64 (hidden 384), 64x64 latents (1024 image
tokens) and 32 prompt tokens, ``qk_norm=None`` so that diffusers' PAG processors (which skip the q/k norms) are
exact peers. One round is one pipeline call with ``num_inference_steps=1`` and ``output_type="latent"``: one
guided denoiser step plus the pipeline's per-call overhead (prompt concatenation, latents, scheduler), the same
for every contender.

Contenders (one benchmark group):

- ``cfg``: the plain pipeline, CFG only (2 rows), the baseline;
- ``fused-layers`` / ``eager-layers``: headpag CFG+PAG on every head of layers 4 and 6, ``mode="image"``
  (diffusers' SD3 semantics), fused (twin rows from block 4 on, one batched forward) and eager (the 2-row call
  plus a separate 1-row perturbed forward with materialised maps);
- ``diffusers-pag-layers``: ``StableDiffusion3PAGPipeline`` built from the same components with
  ``pag_applied_layers`` = exactly blocks 4 and 6 (3 rows through every block);
- ``fused-heads`` / ``eager-heads``: head level, heads ``6:0,7:1`` (joint mode, u=1): fused forks at block 6.

Before anything is timed, fused and eager outputs are checked to agree (and the layer-level fused output to match
diffusers' PAG pipeline), and every guided output to differ from CFG only, so the benchmark times correct code.

Per contender, ``extra_info`` records (besides ``median_ms_per_step`` and ``min_ms_per_step``):

- ``paired_ratio_to_cfg``, the primary ratio: median over rounds of (this round / a CFG-only step run just before
  it, as pytest-benchmark's untimed ``setup``, on an identical copy of the pipeline). On a shared 2-core machine a
  single competing process slows a 2-thread step about 4x, and such load comes and goes within a run; the paired
  ratio holds up, a ratio of medians taken minutes apart does not. For ``cfg`` itself it is a noise check (1.00
  on a quiet machine); ``paired_cfg_median_ms`` shows the load state each contender ran in;
- ``ratio_to_cfg``: median over the ``cfg`` benchmark's median (both in this run);
- ``flop_ratio_to_cfg``: the same step's FLOPs on the meta device over CFG-only's (what a compute-bound step
  would show);
- peak memory: measured before any timing in one fresh subprocess (``python bench/test_guided_step_bench.py
  --peak-rss NAME...``) run with ``MALLOC_MMAP_THRESHOLD_=65536``, so that freed tensors leave the resident set.
  Per contender: one warm-up step, then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), and
  ``step_peak_mib`` is the peak RSS during one step minus the RSS just before it (the step's activations and
  temporaries; the weights are the same for all), ``process_peak_mib`` the process's peak. ``tracemalloc``
  cannot see torch's CPU allocations and ``ru_maxrss`` of the long-lived pytest process only ever rises, hence
  the subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

import headpag

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guided_flops  # noqa: E402  (bench/ is not a package)

LABEL = "torch path + batching"
MODEL = dict(
    sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=64,
    num_attention_heads=6, joint_attention_dim=256, caption_projection_dim=6 * 64, pooled_projection_dim=128,
    pos_embed_max_size=64, qk_norm=None,
)
TEXT_LEN = 32
LATENT = 64
PIXELS = LATENT * 8  # no VAE: the pipeline's vae_scale_factor is 8
GUIDANCE, PAG_SCALE = 5.0, 3.0
ROUNDS, WARMUP_ROUNDS = 5, 1
LAYERS = (4, 6)
LAYER_HEADS = ",".join(f"{i}:*" for i in LAYERS)
HEAD_HEADS = "6:0,7:1"
# Fused and eager compute the same numbers in a different order; observed max |diff| ~1e-5 on latents of size ~1.
TOLERANCE = dict(atol=1e-4, rtol=1e-4)

# The baseline first: the others' ratios read its median.
VARIANTS = {
    "cfg": dict(kind="plain", what="CFG only (plain StableDiffusion3Pipeline, 2 rows)"),
    "fused-layers": dict(kind="fused", heads=LAYER_HEADS, mode="image", what="headpag fused CFG+PAG, every head of layers 4, 6"),
    "eager-layers": dict(kind="eager", heads=LAYER_HEADS, mode="image", what="headpag eager CFG+PAG, every head of layers 4, 6"),
    "diffusers-pag-layers": dict(kind="diffusers", layers=LAYERS, mode="image", what="diffusers StableDiffusion3PAGPipeline, layers 4, 6"),
    "fused-heads": dict(kind="fused", heads=HEAD_HEADS, mode="joint", what="headpag fused CFG+PAG, heads 6:0, 7:1"),
    "eager-heads": dict(kind="eager", heads=HEAD_HEADS, mode="joint", what="headpag eager CFG+PAG, heads 6:0, 7:1"),
}
# Outputs that must agree before timing: (a, b) compared with TOLERANCE.
AGREE = (("fused-layers", "eager-layers"), ("fused-layers", "diffusers-pag-layers"), ("fused-heads", "eager-heads"))


# --------------------------------------------------------------------------------------------------- pipelines


@dataclass
class Pipes:
    pipe: object  # StableDiffusion3Pipeline, patched per contender
    pag: object  # StableDiffusion3PAGPipeline sharing pipe's components
    ref: object | None  # an unpatched copy for the paired CFG rounds
    inputs: dict


def build(with_ref: bool = True) -> Pipes:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3PAGPipeline, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**MODEL).eval()  # constructors leave modules in training mode

    def sd3(t):
        pipe = StableDiffusion3Pipeline(
            transformer=t, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = sd3(transformer)
    names = inspect.signature(StableDiffusion3PAGPipeline.__init__).parameters
    pag = StableDiffusion3PAGPipeline(
        **{k: v for k, v in pipe.components.items() if k in names},
        pag_applied_layers=guided_flops.diffusers_pag_regexes(LAYERS),
    )
    pag.set_progress_bar_config(disable=True)
    ref = sd3(copy.deepcopy(transformer)) if with_ref else None
    g = torch.Generator().manual_seed(1)
    dim, pooled = MODEL["joint_attention_dim"], MODEL["pooled_projection_dim"]
    inputs = dict(
        prompt_embeds=torch.randn(1, TEXT_LEN, dim, generator=g), negative_prompt_embeds=torch.randn(1, TEXT_LEN, dim, generator=g),
        pooled_prompt_embeds=torch.randn(1, pooled, generator=g), negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=g),
        height=PIXELS, width=PIXELS, num_inference_steps=1, guidance_scale=GUIDANCE, output_type="latent",
    )
    return Pipes(pipe, pag, ref, inputs)


def _call(pipe, inputs, **extra):
    return pipe(**inputs, **extra, generator=torch.Generator().manual_seed(0)).images


@contextlib.contextmanager
def activated(name: str, pipes: Pipes):
    """Patches the pipeline for contender ``name`` and yields its one-step function; unpatches afterwards."""
    spec = VARIANTS[name]
    if spec["kind"] == "diffusers":
        yield lambda: _call(pipes.pag, pipes.inputs, pag_scale=PAG_SCALE)
        return
    if spec["kind"] in ("fused", "eager"):
        enable = headpag.enable_fused if spec["kind"] == "fused" else headpag.enable_eager
        enable(pipes.pipe, spec["heads"], scale=PAG_SCALE, mode=spec["mode"])
    try:
        yield lambda: _call(pipes.pipe, pipes.inputs)
    finally:
        headpag.disable(pipes.pipe)


def step_flops() -> dict:
    """FLOPs of each contender's denoiser call for this model, on the meta device."""
    pipe = guided_flops.sd3_pipe(MODEL)
    call = lambda p, rows: guided_flops.sd3_call(p, rows, latent=LATENT, n_text=TEXT_LEN)  # noqa: E731
    return {name: guided_flops.count_variant(pipe, call, 2, spec)[0] for name, spec in VARIANTS.items()}


# --------------------------------------------------------------------------------------------- peak memory


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_rss_child(names) -> dict:
    """Runs in the subprocess, per contender: one warm-up step, reset the peak mark, one measured step."""
    torch.set_num_threads(int(os.environ.get("GUIDED_BENCH_THREADS", torch.get_num_threads())))
    pipes = build(with_ref=False)
    out = {}
    for name in names:
        with activated(name, pipes) as step:
            step()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = _status_kib("VmRSS")
            step()
            peak = _status_kib("VmHWM")
        out[name] = dict(rss_before_step_mib=before / 1024, process_peak_mib=peak / 1024, step_peak_mib=(peak - before) / 1024)
    return out


def peak_rss(names) -> dict:
    """Peak memory of one step of each contender, measured in one fresh subprocess, or why it was not measured.

    With ``MALLOC_MMAP_THRESHOLD_=65536`` glibc serves every allocation of 64 KiB or more by mmap and unmaps it when
    freed, so the resident set falls back after each step and contenders measured one after another in one process
    do not inherit each other's freed memory."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {n: dict(peak_mem="not measured: needs Linux /proc/self/clear_refs to reset the peak-RSS mark") for n in names}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", GUIDED_BENCH_THREADS=str(torch.get_num_threads()))
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--peak-rss", *names], env=env, capture_output=True, text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return {n: dict(peak_mem="not measured: the subprocess timed out") for n in names}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = f"not measured: subprocess failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
        return {n: dict(peak_mem=why) for n in names}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pipes() -> Pipes:
    return build()


@pytest.fixture(scope="module")
def outputs(pipes) -> dict:
    """One step's latents per contender (same noise), computed once before anything is timed."""
    out = {}
    for name in VARIANTS:
        with activated(name, pipes) as step:
            out[name] = step()
    out["ref"] = _call(pipes.ref, pipes.inputs)
    return out


@pytest.fixture(scope="module")
def flops() -> dict:
    """FLOPs per contender, or the error that prevented counting them (the timings do not depend on them)."""
    try:
        return step_flops()
    except Exception as err:  # noqa: BLE001  reported in extra_info, the FLOP test fails on its own
        return {"error": f"{type(err).__name__}: {err}"}


@pytest.fixture(scope="module")
def peak_memory(outputs) -> dict:
    """Peak memory per contender (one subprocess for all), measured while nothing else of this suite runs."""
    return peak_rss(list(VARIANTS))


@pytest.fixture(scope="module")
def medians() -> dict:
    return {}


def test_outputs_agree(outputs):
    """Fused == eager (== diffusers for layer-level PAG) before timing; PAG visibly changes the step."""
    torch.testing.assert_close(outputs["ref"], outputs["cfg"], atol=0, rtol=0)  # the paired baseline is the same model
    for a, b in AGREE:
        torch.testing.assert_close(outputs[a], outputs[b], **TOLERANCE, msg=lambda m, a=a, b=b: f"{a} vs {b}: {m}")
    for name in VARIANTS:
        if name != "cfg":
            assert (outputs[name] - outputs["cfg"]).abs().max() > 1e-3, f"{name} equals CFG only: PAG did nothing"


# ---------------------------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("name", list(VARIANTS))
def test_guided_step(benchmark, pipes, outputs, flops, peak_memory, medians, name):
    spec = VARIANTS[name]
    benchmark.group = f"cpu guided step SD3-shaped {MODEL['num_layers']}x{MODEL['num_attention_heads']} heads, {LATENT}x{LATENT} latents"
    info = benchmark.extra_info
    info.update(
        label=LABEL, impl=name, baseline="cfg", what=spec["what"], kind=spec["kind"], heads=spec.get("heads"),
        layers=list(spec.get("layers", ())), mode=spec.get("mode"), pag_scale=PAG_SCALE, guidance_scale=GUIDANCE,
        model=MODEL, latent=LATENT, image_tokens=(LATENT // MODEL["patch_size"]) ** 2, text_tokens=TEXT_LEN,
        dtype="float32", threads=torch.get_num_threads(), rounds_are="one pipeline call, num_inference_steps=1",
        diffusers=__import__("diffusers").__version__, headpag=guided_flops.headpag_source(),
    )
    # Correct before timed: the pairs this contender is part of agree (test_outputs_agree reports details).
    for a, b in AGREE:
        if name in (a, b):
            info[f"max_abs_diff_{a}_vs_{b}"] = float((outputs[a] - outputs[b]).abs().max())
            torch.testing.assert_close(outputs[a], outputs[b], **TOLERANCE)
    if name != "cfg":
        info["max_abs_diff_vs_cfg"] = float((outputs[name] - outputs["cfg"]).abs().max())
    if "error" in flops:
        info["flops"] = f"not counted: {flops['error']}"
    else:
        info["gflop"] = flops[name] / 1e9
        info["flop_ratio_to_cfg"] = flops[name] / flops["cfg"]

    info.update(peak_memory[name])

    paired: list[float] = []

    def paired_cfg_step():  # setup of every round: an unpatched CFG step, timed here, not by pytest-benchmark
        t0 = time.perf_counter()
        _call(pipes.ref, pipes.inputs)
        paired.append(time.perf_counter() - t0)

    with activated(name, pipes) as step:
        benchmark.pedantic(step, setup=paired_cfg_step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    if benchmark.stats is None:  # --benchmark-disable
        return
    times = list(benchmark.stats.stats.data)
    median = statistics.median(times)
    info["median_ms_per_step"] = median * 1e3
    info["min_ms_per_step"] = min(times) * 1e3
    if name in flops:
        info["gflop_per_s"] = flops[name] / median / 1e9
    pairs = paired[-len(times):]
    info["paired_cfg_median_ms"] = statistics.median(pairs) * 1e3
    info["paired_ratio_to_cfg"] = statistics.median(t / c for t, c in zip(times, pairs))
    if name == "cfg":
        medians["cfg"] = median
    base = medians.get("cfg")
    if base is not None:
        info["ratio_to_cfg"] = median / base


# ------------------------------------------------------------------------------------------------------ FLOPs


def test_flops_full_size():
    """Meta-device FLOPs of one guided step of SD3-medium and FLUX.1-dev; writes guided-step-flops.json.
    Fused must be within 2 % of the theoretical minimum (base rows everywhere, twins from the fork unit on,
    identity heads' attention skipped)."""
    data = guided_flops.run()
    os.makedirs(os.path.dirname(guided_flops.RESULTS), exist_ok=True)
    with open(guided_flops.RESULTS, "w") as f:
        json.dump(data, f, indent=1)
    for r in data["results"]:
        assert r["ratios"]["fused/minimum"] <= 1.02, (r["model"], r["ratios"], r["fused_excess_over_minimum"])
        assert r["flops"]["fused"] < r["flops"]["eager"]


# ------------------------------------------------------------------------------------------------------- main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="peak-RSS helper of the guided-step benchmark (run by the suite)")
    parser.add_argument("--peak-rss", choices=list(VARIANTS), nargs="+", required=True, metavar="NAME")
    args = parser.parse_args()
    print(json.dumps(peak_rss_child(args.peak_rss)))
