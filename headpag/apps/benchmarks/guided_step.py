"""Wall clock of one guided denoiser step of a real diffusers pipeline: headpag against its baselines.

One suite, two settings families (``SETTINGS``):

- ``cpu``: an SD3-shaped ``StableDiffusion3Pipeline`` with random weights (eval, fp32): 8 joint blocks x 6 heads of
  dim 64, 64x64 latents (1024 image tokens), 32 prompt tokens, sized to be compute-bound on a small CPU (CFG only
  runs at about SDPA's GFLOP/s). Without a GPU ``perturbed_attention`` runs its torch path, so the numbers show what
  the fork/twin batching and the identity shortcut buy, not the Triton kernel: labelled "torch path + batching".
- ``cuda-small`` and ``cuda-sd3-medium`` (need CUDA): the same small model, and the full SD3-medium transformer
  config at 1024x1024 (4096 image + 333 text tokens), bf16, random weights; ``perturbed_attention`` runs the Triton
  kernel. The full-size setting carries the roofline projection of the same step next to its measured time.

``qk_norm=None`` everywhere, so that diffusers' PAG processors (which skip the q/k norms) are exact peers. One round
is one pipeline call with ``num_inference_steps=1`` and ``output_type="latent"``: one guided denoiser step plus the
pipeline's per-call overhead, the same for every contender.

Contenders (``CONTENDERS``): ``cfg`` (plain pipeline, CFG only, the baseline); ``fused-layers`` / ``eager-layers``
(every head of layers 4 and 6, ``mode="image"``, diffusers' SD3 semantics); ``diffusers-pag-layers``
(``StableDiffusion3PAGPipeline`` on exactly blocks 4 and 6: 3 rows through every block); ``fused-heads`` /
``eager-heads`` (heads ``6:0,7:1``, joint mode, u=1).

Before anything is timed, fused and eager outputs must agree (and layer-level fused must match diffusers' PAG
pipeline), and every guided output must differ from CFG only (``check_outputs``).

Ratios are *paired*: each timed round follows an untimed CFG-only step on an identical copy of the pipeline, and
the ratio is the median over rounds of (round / its CFG step). On a shared machine, load comes and goes within a
run; a paired ratio holds up where a ratio of medians taken minutes apart does not. ``cfg`` against its own copy is
the noise check (1.00 on a quiet machine).

Peak memory of one step: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what
was allocated before the step; on CPU the peak RSS of one step in a fresh subprocess run with
``MALLOC_MMAP_THRESHOLD_=65536`` (freed tensors leave the resident set), after resetting the kernel's peak mark
through ``/proc/self/clear_refs`` (``tracemalloc`` cannot see torch's CPU allocations).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

import headpag
from headpag.guided import EXECUTIONS
from headpag.kernels import HAS_TRITON

from . import meta_flops, roofline, timing
from .machine import headpag_source, machine_info

SMALL_SD3 = dict(
    sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=64,
    num_attention_heads=6, joint_attention_dim=256, caption_projection_dim=6 * 64, pooled_projection_dim=128,
    pos_embed_max_size=64, qk_norm=None,
)
GUIDANCE, PAG_SCALE = 5.0, 3.0
LAYERS = (4, 6)
LAYER_HEADS = ",".join(f"{i}:*" for i in LAYERS)
HEAD_HEADS = "6:0,7:1"


@dataclass(frozen=True)
class Setting:
    """One model / device / dtype the suite runs on. ``latent``: latent side (pixels / 8); ``text``: prompt tokens."""

    name: str
    model: dict
    latent: int
    text: int
    device: str
    dtype: torch.dtype
    rounds: int
    warmup: int
    label: str
    project_roofline: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def image_tokens(self) -> int:
        return (self.latent // self.model["patch_size"]) ** 2

    def to_json(self) -> str:
        return json.dumps(dict(self.__dict__, dtype=str(self.dtype).removeprefix("torch.")))

    @classmethod
    def from_json(cls, text: str) -> "Setting":
        data = json.loads(text)
        return cls(**dict(data, dtype=getattr(torch, data["dtype"])))


SETTINGS = {
    "cpu": Setting("cpu", SMALL_SD3, 64, 32, "cpu", torch.float32, rounds=7, warmup=1,
                   label="CPU, torch path + batching (no GPU: perturbed_attention runs its torch path, not the kernel)"),
    "cuda-small": Setting("cuda-small", SMALL_SD3, 64, 32, "cuda", torch.bfloat16, rounds=20, warmup=3,
                          label="GPU, Triton kernel, the CPU setting's small SD3-shaped model in bf16"),
    "cuda-sd3-medium": Setting("cuda-sd3-medium", dict(meta_flops.SD3_MEDIUM, qk_norm=None), 128, meta_flops.SD3_TEXT,
                               "cuda", torch.bfloat16, rounds=10, warmup=3, project_roofline=True,
                               label="GPU, Triton kernel, SD3-medium transformer config at 1024x1024, bf16, random weights"),
}

# The baseline first.
CONTENDERS = {
    "cfg": dict(kind="plain", what="CFG only (plain StableDiffusion3Pipeline, 2 rows)"),
    "fused-layers": dict(kind="fused", heads=LAYER_HEADS, mode="image", what="headpag fused CFG+PAG, every head of layers 4, 6"),
    "eager-layers": dict(kind="eager", heads=LAYER_HEADS, mode="image", what="headpag eager CFG+PAG, every head of layers 4, 6"),
    "diffusers-pag-layers": dict(kind="diffusers", layers=LAYERS, mode="image", what="diffusers StableDiffusion3PAGPipeline, layers 4, 6"),
    "fused-heads": dict(kind="fused", heads=HEAD_HEADS, mode="joint", what="headpag fused CFG+PAG, heads 6:0, 7:1"),
    "eager-heads": dict(kind="eager", heads=HEAD_HEADS, mode="joint", what="headpag eager CFG+PAG, heads 6:0, 7:1"),
}
# Outputs that must agree before timing.
AGREE = (("fused-layers", "eager-layers"), ("fused-layers", "diffusers-pag-layers"), ("fused-heads", "eager-heads"))
# Fused and eager compute the same numbers in a different order (and eager's maps in fp32). fp32: element-wise,
# observed max |diff| ~1e-5 on latents of size ~1. Half precision: relative error of the whole output,
# ||a - b|| / ||b||, a few roundings of bf16 (eps 7.8e-3) or fp16 (eps 9.8e-4).
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4)}
RELATIVE_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
MIN_PAG_EFFECT = 1e-3


def available(setting: Setting) -> str | None:
    """Why ``setting`` cannot run on this machine, or ``None``."""
    if setting.device == "cuda" and not torch.cuda.is_available():
        return "skipped: no CUDA device (torch.cuda.is_available() is False)"
    if setting.device == "cuda" and not HAS_TRITON:
        return "skipped: no triton, perturbed_attention would run its torch path (pip install 'headpag[triton]')"
    if setting.device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        return "skipped: TRITON_INTERPRET=1 is set, the kernel would be interpreted, not timed"
    return None


def synchronize(setting: Setting):
    """The device synchronisation to run inside a timed region (``None`` on CPU)."""
    return torch.cuda.synchronize if setting.device == "cuda" else None


@dataclass
class Pipes:
    setting: Setting
    pipe: object  # StableDiffusion3Pipeline, patched per contender
    pag: object  # StableDiffusion3PAGPipeline sharing pipe's components
    ref: object | None  # an unpatched copy for the paired CFG rounds
    inputs: dict


def build(setting: Setting, with_ref: bool = True) -> Pipes:
    """The setting's pipelines (random weights, seed 0) on its device and dtype, and one step's inputs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3PAGPipeline, StableDiffusion3Pipeline

    torch.manual_seed(0)
    with torch.device(setting.device):
        transformer = SD3Transformer2DModel(**setting.model).eval()
    if setting.dtype != torch.float32:
        transformer = transformer.to(setting.dtype)

    def sd3(t):
        pipe = StableDiffusion3Pipeline(
            transformer=t, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = sd3(transformer)
    names = inspect.signature(StableDiffusion3PAGPipeline.__init__).parameters
    pag = StableDiffusion3PAGPipeline(**{k: v for k, v in pipe.components.items() if k in names},
                                      pag_applied_layers=meta_flops.diffusers_pag_regexes(LAYERS))
    pag.set_progress_bar_config(disable=True)
    ref = sd3(copy.deepcopy(transformer)) if with_ref else None
    g = torch.Generator().manual_seed(1)
    dim, pooled = setting.model["joint_attention_dim"], setting.model["pooled_projection_dim"]
    randn = lambda *shape: torch.randn(*shape, generator=g).to(setting.device, setting.dtype)  # noqa: E731
    inputs = dict(
        prompt_embeds=randn(1, setting.text, dim), negative_prompt_embeds=randn(1, setting.text, dim),
        pooled_prompt_embeds=randn(1, pooled), negative_pooled_prompt_embeds=randn(1, pooled),
        height=setting.latent * 8, width=setting.latent * 8, num_inference_steps=1, guidance_scale=GUIDANCE,
        output_type="latent",
    )
    return Pipes(setting, pipe, pag, ref, inputs)


def _call(pipe, pipes: Pipes, **extra):
    generator = torch.Generator(pipes.setting.device).manual_seed(0)
    return pipe(**pipes.inputs, **extra, generator=generator).images


@contextlib.contextmanager
def activated(name: str, pipes: Pipes):
    """Patches the pipeline for contender ``name`` and yields its one-step function (which synchronises the
    device before returning); unpatches afterwards."""
    spec = CONTENDERS[name]
    sync = synchronize(pipes.setting)

    def finish(images):
        if sync is not None:
            sync()
        return images

    if spec["kind"] == "diffusers":
        yield lambda: finish(_call(pipes.pag, pipes, pag_scale=PAG_SCALE))
        return
    if spec["kind"] in EXECUTIONS:
        enable = headpag.enable_fused if spec["kind"] == "fused" else headpag.enable_eager
        enable(pipes.pipe, spec["heads"], scale=PAG_SCALE, mode=spec["mode"])
    try:
        yield lambda: finish(_call(pipes.pipe, pipes))
    finally:
        headpag.disable(pipes.pipe)


def reference_step(pipes: Pipes):
    """One CFG-only step on the unpatched copy (the paired baseline), synchronised."""
    out = _call(pipes.ref, pipes)
    if (sync := synchronize(pipes.setting)) is not None:
        sync()
    return out


def outputs(pipes: Pipes) -> dict:
    """One step's latents per contender (same noise) plus ``"ref"`` (the paired copy), computed before timing."""
    out = {}
    for name in CONTENDERS:
        with activated(name, pipes) as step:
            out[name] = step()
    out["ref"] = reference_step(pipes)
    return out


def check_outputs(out: dict, dtype: torch.dtype) -> dict:
    """Raises ``AssertionError`` unless the paired copy equals CFG only, the ``AGREE`` pairs agree within the dtype's
    tolerance (element-wise in fp32, relative norm in half precision) and every guided output differs from CFG only;
    returns the max |diff| (and in half precision the relative error) of each comparison."""
    diffs = {"ref_vs_cfg": float((out["ref"] - out["cfg"]).abs().max())}
    torch.testing.assert_close(out["ref"], out["cfg"], atol=0, rtol=0, msg=lambda m: f"paired copy vs cfg: {m}")
    for a, b in AGREE:
        x, y = out[a].float(), out[b].float()
        diffs[f"{a}_vs_{b}"] = float((x - y).abs().max())
        if dtype in TOLERANCE:
            torch.testing.assert_close(x, y, **TOLERANCE[dtype], msg=lambda m, a=a, b=b: f"{a} vs {b}: {m}")
        else:
            relative = float((x - y).norm() / y.norm())
            diffs[f"{a}_vs_{b}_relative"] = relative
            assert relative <= RELATIVE_TOLERANCE[dtype], f"{a} vs {b}: relative error {relative:.2e} > {RELATIVE_TOLERANCE[dtype]}"
    for name in CONTENDERS:
        if name != "cfg":
            diffs[f"{name}_vs_cfg"] = d = float((out[name].float() - out["cfg"].float()).abs().max())
            assert d > MIN_PAG_EFFECT, f"{name} equals CFG only (max |diff| {d:.2e}): PAG did nothing"
    return diffs


def step_flops(setting: Setting) -> dict:
    """FLOPs of each contender's denoiser call for the setting's model, counted on the meta device."""
    pipe = meta_flops.sd3_pipe(setting.model)
    call = lambda p, rows: meta_flops.sd3_call(p, rows, latent=setting.latent, n_text=setting.text)  # noqa: E731
    return {name: meta_flops.count_variant(pipe, call, 2, spec)[0] for name, spec in CONTENDERS.items()}


# ---------------------------------------------------------------------------------------------- peak memory

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _cpu_peak_child(setting: Setting, names) -> dict:
    """In the subprocess, per contender: one warm-up step, reset the peak-RSS mark, one measured step."""
    torch.set_num_threads(int(os.environ.get("HEADPAG_BENCH_THREADS", torch.get_num_threads())))
    pipes = build(setting, with_ref=False)
    out = {}
    for name in names:
        with activated(name, pipes) as step:
            step()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = _status_kib("VmRSS")
            step()
            peak = _status_kib("VmHWM")
        out[name] = dict(step_peak_mib=(peak - before) / 1024, process_peak_mib=peak / 1024, how="RSS, subprocess")
    return out


def _cpu_peak(setting: Setting, names) -> dict:
    if not os.path.exists("/proc/self/clear_refs"):
        return {n: dict(not_measured="needs Linux /proc/self/clear_refs to reset the peak-RSS mark") for n in names}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HEADPAG_BENCH_THREADS=str(torch.get_num_threads()))
    try:
        proc = subprocess.run([sys.executable, "-m", __name__, "--peak-rss", setting.to_json(), *names], env=env,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {n: dict(not_measured="the peak-RSS subprocess timed out") for n in names}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = f"the peak-RSS subprocess failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
        return {n: dict(not_measured=why) for n in names}
    return json.loads(lines[-1])


def _cuda_peak(pipes: Pipes, names) -> dict:
    out = {}
    for name in names:
        with activated(name, pipes) as step:
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            peak = torch.cuda.max_memory_allocated()
        out[name] = dict(step_peak_mib=(peak - before) / 2**20, process_peak_mib=peak / 2**20,
                         how="torch.cuda.max_memory_allocated")
    return out


def peak_memory(pipes: Pipes, names=tuple(CONTENDERS)) -> dict:
    """Peak memory of one step per contender (``step_peak_mib``: the step's activations and temporaries)."""
    if pipes.setting.device == "cuda":
        return _cuda_peak(pipes, names)
    return _cpu_peak(pipes.setting, names)


# ------------------------------------------------------------------------------------------------ the suite

def record(name: str, times: list[float], paired: list[float], flops: dict) -> dict:
    """One contender's results from its timed rounds and the paired CFG rounds just before each."""
    spec = CONTENDERS[name]
    ratios = [t / c for t, c in zip(times, paired)]
    out = dict(impl=name, what=spec["what"], kind=spec["kind"], heads=spec.get("heads"), layers=list(spec.get("layers", ())),
               mode=spec.get("mode"), **timing.summary(times), paired_cfg_median_ms=timing.summary(paired)["median_ms"],
               paired_ratio_to_cfg=timing.ratio_summary(ratios))
    if name in flops:
        out["gflop"] = flops[name] / 1e9
        out["flop_ratio_to_cfg"] = flops[name] / flops["cfg"]
        out["gflop_per_s"] = flops[name] / (out["median_ms"] / 1e3) / 1e9
    return out


def paired_reference(pipes: Pipes) -> tuple[Callable[[], None], list[float]]:
    """``(setup, paired)``: ``setup`` runs one CFG-only step on the identical copy and appends its seconds to
    ``paired``; run before every timed round, it gives the round its paired reference."""
    paired: list[float] = []

    def setup():
        paired.extend(timing.time_rounds(lambda: reference_step(pipes), rounds=1, warmup=0))

    return setup, paired


def time_contender(name: str, pipes: Pipes, rounds: int, warmup: int) -> tuple[list[float], list[float]]:
    """(seconds per round of ``name``, seconds of the paired CFG step before each round)."""
    setup, paired = paired_reference(pipes)
    with activated(name, pipes) as step:
        times = timing.time_rounds(step, rounds=rounds, warmup=warmup, setup=setup)
    return times, paired[-rounds:]


@dataclass
class Prepared:
    """A setting ready to time: its pipelines, the checked outputs' differences, FLOPs per contender (or
    ``{"error": ...}``), peak memory per contender and the denoiser's parameter count."""

    pipes: Pipes
    diffs: dict
    flops: dict
    memory: dict
    parameters: int


def prepare(setting: Setting) -> Prepared:
    """Builds the setting's pipelines, checks every contender's output, counts FLOPs and measures peak memory."""
    pipes = build(setting)
    diffs = check_outputs(outputs(pipes), setting.dtype)
    try:
        flops = step_flops(setting)
    except Exception as err:  # noqa: BLE001  the timings do not depend on the counts: report and go on
        flops = {"error": f"{type(err).__name__}: {err}"}
    parameters = sum(p.numel() for p in pipes.pipe.transformer.parameters())
    return Prepared(pipes, diffs, flops, peak_memory(pipes), parameters)


def run(setting: Setting | str, rounds: int | None = None, warmup: int | None = None) -> dict:
    """The whole suite on one setting: check outputs, count FLOPs, measure peak memory, then time every contender
    (``rounds`` / ``warmup`` default to the setting's). Returns a JSON-ready dict; ``{"skipped": why}`` when the
    setting cannot run here."""
    if isinstance(setting, str):
        if setting not in SETTINGS:
            raise ValueError(f"setting must be a Setting or one of {', '.join(SETTINGS)}; got {setting!r}")
        setting = SETTINGS[setting]
    if (why := available(setting)) is not None:
        return dict(setting=setting.name, skipped=why)
    rounds = setting.rounds if rounds is None else rounds
    warmup = setting.warmup if warmup is None else warmup
    prepared = prepare(setting)
    pipes, diffs, flops, memory, params = (prepared.pipes, prepared.diffs, prepared.flops, prepared.memory,
                                           prepared.parameters)
    results = {}
    for name in CONTENDERS:
        times, paired = time_contender(name, pipes, rounds, warmup)
        results[name] = dict(record(name, times, paired, flops), **memory.get(name, {}))
    base = results["cfg"]["median_ms"]
    for r in results.values():
        r["ratio_of_medians_to_cfg"] = r["median_ms"] / base
    if setting.project_roofline and "error" not in flops:
        for name, r in results.items():
            r["roofline_h100_projection"] = roofline.project(flops[name], params)
    return dict(
        setting=setting.name, label=setting.label, device=setting.device, gpu=machine_info()["gpu"],
        dtype=str(setting.dtype).removeprefix("torch."), model=setting.model, parameters=params,
        image_tokens=setting.image_tokens, text_tokens=setting.text, guidance_scale=GUIDANCE, pag_scale=PAG_SCALE,
        rounds=rounds, warmup=warmup, threads=torch.get_num_threads(), round_is="one pipeline call, num_inference_steps=1",
        max_abs_diffs=diffs, flops_error=flops.get("error"), noise_check=results["cfg"]["paired_ratio_to_cfg"],
        headpag=headpag_source(), contenders=results,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="peak-RSS helper of the guided-step suite (run by the suite)")
    parser.add_argument("--peak-rss", nargs="+", required=True, metavar="ARG",
                        help="the setting as JSON (Setting.to_json), then contender names")
    args = parser.parse_args()
    setting_json, *names = args.peak_rss
    if not names or any(n not in CONTENDERS for n in names):
        parser.error(f"--peak-rss takes a setting's JSON, then contenders among {', '.join(CONTENDERS)}")
    print(json.dumps(_cpu_peak_child(Setting.from_json(setting_json), names)))
