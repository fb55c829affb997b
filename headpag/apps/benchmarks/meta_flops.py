"""FLOPs of one guided denoiser step on the meta device: full-size models, no weights, no GPU.

``FlopCounterMode`` counts matrix products (``2 * m * n * k``) on meta tensors, where SDPA runs the math path and
``headpag::perturbed_attention`` is costed by its registered formula (kernels/flops.py). On CPU tensors SDPA
would count as 0 FLOPs, hence meta.

The models are built from real configs under ``with torch.device("meta")`` and wrapped in real
``StableDiffusion3Pipeline`` / ``FluxPipeline`` / ``Flux2Pipeline`` / ``QwenImagePipeline`` / ``WanPipeline``
objects (no VAE, no text encoders, a real scheduler with 28 timesteps), so ``headpag.enable_fused`` /
``enable_eager`` patch them exactly as they patch a loaded pipeline. The denoiser is then called as the pipeline's
loop calls it for one step (headpag treats every call on meta as guided: the step position cannot be read from a
meta timestep).

Contenders (``count_variant``): CFG only (the base rows: 2 ``[uncond, cond]`` with CFG, 1 without or for Flux's
distilled guidance; for the pipelines with separate cond and uncond calls, Flux's true CFG, Qwen-Image and Wan, a
1-row cond call under ``cache_context("cond")`` and a 1-row uncond call under ``cache_context("uncond")``),
headpag fused (base rows up to the fork unit, then one twin per cond row), headpag eager (the base call plus a
separate 1-row perturbed forward), diffusers' ``StableDiffusion3PAGPipeline`` processors on the same layers (3 rows
through every block).

Theoretical minimum of a guided step (``analyse``): the base rows through the whole denoiser, plus each twin row
through the fork unit (the first forward-loop unit holding a selected head) and everything after it, minus the
attention skipped by identity heads (joint mode, ``u = 1``: ``4 * N * N * D`` per selected head per twin row).
Per-row unit costs come from the CFG-only count's per-module breakdown divided by its rows (every module's FLOPs
are linear in the rows). What fused does beyond that is the twin rows' pass through the pre-loop embeddings
(``pos_embed``, ``time_text_embed``, ``context_embedder``...), which headpag widens at the denoiser's entry; the
results list the per-module excess.
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

import headpag
from headpag import forward_units, list_layers

SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
SD3_TEXT, FLUX_TEXT = 333, 512
LATENT = 128  # 1024 px / VAE factor 8

# FLUX.2-dev: Flux2Transformer2DModel's __init__ defaults (diffusers 0.42), which are dev's: 8 double + 48 single
# blocks x 48 heads of 128, joint_attention_dim 15360 (3 Mistral-Small-3.1 hidden layers of 5120 stacked).
FLUX2_DEV = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=48, attention_head_dim=128,
    num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True,
)
# Qwen-Image: QwenImageTransformer2DModel's __init__ defaults: 60 double-stream blocks x 24 heads of 128,
# joint_attention_dim 3584 (Qwen2.5-VL-7B hidden states), no guidance embedding (true CFG).
QWEN_IMAGE = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56), zero_cond_t=False,
    use_additional_t_cond=False, use_layer3d_rope=False,
)
# Wan 2.1 T2V-14B: WanTransformer3DModel's __init__ defaults: 40 blocks x 40 heads of 128, ffn 13824, text_dim 4096
# (UMT5-XXL), no image cross-attention (T2V).
WAN_T2V_14B = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None,
)
# Native resolutions. FLUX.2-dev 1024x1024: VAE factor 8 -> 128x128 latents of 32 channels, patchified 2x2 by the
# pipeline -> 64x64 = 4096 tokens of 128 channels; 512 text tokens (Flux2Pipeline's max_sequence_length).
FLUX2_SIDE, FLUX2_TEXT = 64, 512
# Qwen-Image 1328x1328 (its 1:1 native size): VAE factor 8 -> 166x166 latents, packed 2x2 -> 83x83 = 6889 tokens of
# 64 channels; 256 text tokens (the prompt's own length after the 34-token template is dropped; the pipeline pads
# to the longest prompt, at most 1024 - here an assumed long prompt).
QWEN_SIDE, QWEN_TEXT = 83, 256
# Wan 2.1 T2V-14B 832x480, 81 frames: VAE 4x8x8 -> 21 x 60 x 104 latents, patch 1x2x2 -> 21 x 30 x 52 = 32760 video
# tokens; 512 UMT5 text tokens (WanPipeline's max_sequence_length), cross-attention only.
WAN_FRAMES, WAN_HEIGHT, WAN_WIDTH, WAN_TEXT = 21, 60, 104, 512
WAN_TOKENS = WAN_FRAMES * (WAN_HEIGHT // 2) * (WAN_WIDTH // 2)
SCALE = 3.0
STEPS = 28


def _count(fn) -> tuple[int, dict]:
    """Total FLOPs of ``fn()`` and the per-module totals (``{module name: flops}``, names as FlopCounterMode
    gives them: ``"<RootClass>.transformer_blocks.4"``...)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


TRANSFORMER_LOOPS = ("transformer_blocks", "single_transformer_blocks")


def children(per_module: dict, root: str, loops: tuple[str, ...] = TRANSFORMER_LOOPS) -> dict:
    """FLOPs per direct child of the root (``pos_embed``...) and per forward-loop unit (``transformer_blocks.3``;
    ``loops`` names the module lists whose items are units)."""
    out = {}
    for name, flops in per_module.items():
        parts = name.split(".")
        if parts[0] != root or len(parts) < 2:
            continue
        if parts[1] in loops:
            if len(parts) == 3:
                out[".".join(parts[1:])] = flops
        elif len(parts) == 2:
            out[parts[1]] = flops
    return out


def _minimum(cfg_children: dict, cfg_total: int, n_base: int, n_twin: int, units: list, fork: int,
             identity_pairs: int, N: int, D: int, loops: tuple[str, ...] = TRANSFORMER_LOOPS) -> dict:
    """The theoretical minimum of a guided step (see the module docstring) and its parts."""
    per_row = {k: v / n_base for k, v in cfg_children.items()}
    after_fork = sum(per_row.get(u, 0) for u in units[fork:]) + sum(per_row.get(m, 0) for m in ("norm_out", "proj_out"))
    skipped = identity_pairs * n_twin * 4 * N * N * D
    minimum = cfg_total + n_twin * after_fork - skipped
    pre_loop = {k: v for k, v in per_row.items() if not k.startswith(tuple(f"{loop}." for loop in loops))
                and k not in ("norm_out", "proj_out")}
    return dict(flops=int(round(minimum)), twin_row_after_fork=int(round(after_fork)), identity_skipped=skipped,
                per_row_pre_loop={k: int(v) for k, v in pre_loop.items()})


def _excess(fused_children: dict, cfg_children: dict, n_base: int, n_twin: int, units: list, fork: int,
            identity_by_unit: dict) -> dict:
    """Per module: fused FLOPs minus what the minimum allots it (base rows everywhere, twins from the fork on,
    identity heads skipped). Non-zero entries explain fused/minimum."""
    allowed = {}
    twin_modules = set(units[fork:]) | {"norm_out", "proj_out"}
    for name, flops in cfg_children.items():
        rows = n_base + (n_twin if name in twin_modules else 0)
        allowed[name] = flops / n_base * rows - identity_by_unit.get(name, 0)
    out = {}
    for name in sorted(set(allowed) | set(fused_children)):
        diff = fused_children.get(name, 0) - allowed.get(name, 0)
        if abs(diff) > 0.5:
            out[name] = int(round(diff))
    return out


def sd3_pipe(config: dict):
    """A ``StableDiffusion3Pipeline`` around an ``SD3Transformer2DModel(**config)`` built on the meta device."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.scheduler.set_timesteps(STEPS)
    pipe._guidance_scale = 7.0  # do_classifier_free_guidance: rows [uncond, cond]
    pipe._joint_attention_kwargs = None
    return pipe


def flux_pipe(config: dict):
    """A ``FluxPipeline`` around a ``FluxTransformer2DModel(**config)`` built on the meta device."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**config).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=transformer,
    )
    pipe.scheduler.set_timesteps(STEPS)
    pipe._guidance_scale = 3.5
    pipe._joint_attention_kwargs = None
    return pipe


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def sd3_call(pipe, rows: int, latent: int = LATENT, n_text: int = SD3_TEXT):
    """One SD3 denoiser call as the pipeline makes it (``rows`` rows, meta inputs)."""
    cfg = pipe.transformer.config
    return lambda: pipe.transformer(
        hidden_states=_meta(rows, cfg.in_channels, latent, latent), timestep=_meta(rows),
        encoder_hidden_states=_meta(rows, n_text, cfg.joint_attention_dim),
        pooled_projections=_meta(rows, cfg.pooled_projection_dim), joint_attention_kwargs=None, return_dict=False,
    )


def flux_call(pipe, rows: int, latent: int = LATENT, n_text: int = FLUX_TEXT, context: str = "cond"):
    """One Flux denoiser call under ``cache_context(context)`` as FluxPipeline makes it (meta inputs)."""
    cfg = pipe.transformer.config
    n_img = (latent // 2) ** 2  # 2x2 packing of the latents

    def call():
        with pipe.transformer.cache_context(context):
            return pipe.transformer(
                hidden_states=_meta(rows, n_img, cfg.in_channels), timestep=_meta(rows), guidance=_meta(rows),
                pooled_projections=_meta(rows, cfg.pooled_projection_dim),
                encoder_hidden_states=_meta(rows, n_text, cfg.joint_attention_dim),
                txt_ids=_meta(n_text, 3), img_ids=_meta(n_img, 3), joint_attention_kwargs=None, return_dict=False,
            )

    return call


def flux_true_cfg_call(pipe, rows: int, latent: int = LATENT, n_text: int = FLUX_TEXT):
    """FluxPipeline with true CFG (``true_cfg_scale > 1``): per step one cond call under ``cache_context("cond")``
    and one uncond call under ``cache_context("uncond")``, one row each; ``rows`` counts both (2), or 1 for the
    cond call alone."""
    if rows == 1:
        return flux_call(pipe, 1, latent, n_text)
    if rows != 2:
        raise ValueError(f"rows must be 1 or 2 for Flux true CFG (cond, uncond), got {rows}")
    cond = flux_call(pipe, 1, latent, n_text)
    uncond = flux_call(pipe, 1, latent, n_text, context="uncond")

    def call():
        return cond(), uncond()

    return call


def _separate_cfg(single, pipe, rows: int, family: str):
    """A pipeline step with separate cond and uncond calls (true CFG): ``single(pipe, 1, context)`` is one 1-row
    call under ``cache_context(context)``; the cond call first, then the uncond call, as the pipelines' loops make
    them (headpag twins the cond call and shifts the uncond call by its delta). ``rows`` counts both calls (2), or 1
    for the cond call alone (CFG off)."""
    if rows == 1:
        return single(pipe, 1, "cond")
    if rows != 2:
        raise ValueError(f"rows must be 1 or 2 for {family} (cond, uncond), got {rows}")
    cond, uncond = single(pipe, 1, "cond"), single(pipe, 1, "uncond")

    def call():
        return cond(), uncond()

    return call


def flux2_pipe(config: dict = FLUX2_DEV):
    """A ``Flux2Pipeline`` around a ``Flux2Transformer2DModel(**config)`` built on the meta device (FLUX.2-dev:
    distilled guidance, one cond call per step, no cache_context)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**config).eval()
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                         transformer=transformer)
    pipe.scheduler.set_timesteps(STEPS)
    pipe._guidance_scale = 4.0
    pipe._attention_kwargs = None
    return pipe


def flux2_call(pipe, rows: int, side: int = FLUX2_SIDE, n_text: int = FLUX2_TEXT):
    """One FLUX.2 denoiser call as Flux2Pipeline makes it: packed latents ``(rows, side^2, in_channels)``, timestep
    and guidance per row (the pipeline passes ``t / 1000``; meta here), 4-axis position ids ``(rows, L, 4)``."""
    cfg = pipe.transformer.config
    n_img = side * side
    return lambda: pipe.transformer(
        hidden_states=_meta(rows, n_img, cfg.in_channels), timestep=_meta(rows), guidance=_meta(rows),
        encoder_hidden_states=_meta(rows, n_text, cfg.joint_attention_dim), txt_ids=_meta(rows, n_text, 4),
        img_ids=_meta(rows, n_img, 4), joint_attention_kwargs=None, return_dict=False,
    )


def qwen_pipe(config: dict = QWEN_IMAGE):
    """A ``QwenImagePipeline`` around a ``QwenImageTransformer2DModel(**config)`` built on the meta device."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**config).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    pipe.scheduler.set_timesteps(STEPS)
    pipe._attention_kwargs = {}  # what QwenImagePipeline.__call__ sets when none is given
    return pipe


def qwen_call(pipe, rows: int, context: str = "cond", side: int = QWEN_SIDE, n_text: int = QWEN_TEXT):
    """One Qwen-Image denoiser call under ``cache_context(context)`` as QwenImagePipeline makes it: packed latents
    ``(rows, side^2, in_channels)``, ``t / 1000`` per row (meta here), no guidance embedding, no text mask (the
    pipeline drops an all-ones mask), ``img_shapes`` one ``(1, side, side)`` per row."""
    cfg = pipe.transformer.config

    def call():
        with pipe.transformer.cache_context(context):
            return pipe.transformer(
                hidden_states=_meta(rows, side * side, cfg.in_channels), timestep=_meta(rows), guidance=None,
                encoder_hidden_states_mask=None, encoder_hidden_states=_meta(rows, n_text, cfg.joint_attention_dim),
                img_shapes=[[(1, side, side)]] * rows, attention_kwargs=pipe.attention_kwargs, return_dict=False,
            )

    return call


def qwen_true_cfg_call(pipe, rows: int, side: int = QWEN_SIDE, n_text: int = QWEN_TEXT):
    """QwenImagePipeline's step: with true CFG (``true_cfg_scale > 1`` and a negative prompt, the default) a 1-row cond
    call under ``cache_context("cond")`` then a 1-row uncond call under ``cache_context("uncond")`` (``rows`` = 2);
    CFG off: the cond call alone (``rows`` = 1)."""
    return _separate_cfg(lambda p, r, context: qwen_call(p, r, context, side, n_text), pipe, rows, "Qwen-Image")


def wan_pipe(config: dict = WAN_T2V_14B):
    """A ``WanPipeline`` around a ``WanTransformer3DModel(**config)`` built on the meta device, with the
    Wan-AI/Wan2.1-T2V-14B-Diffusers scheduler (UniPC, flow prediction; flow_shift 3.0 for 480p)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    with torch.device("meta"):
        transformer = WanTransformer3DModel(**config).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)
    pipe.scheduler.set_timesteps(STEPS)
    pipe._guidance_scale = 5.0
    pipe._attention_kwargs = None
    return pipe


def wan_call(pipe, rows: int, context: str = "cond", frames: int = WAN_FRAMES, height: int = WAN_HEIGHT,
             width: int = WAN_WIDTH, n_text: int = WAN_TEXT):
    """One Wan denoiser call under ``cache_context(context)`` as WanPipeline makes it: latents
    ``(rows, C, frames, height, width)``, the scheduler's timestep per row (meta here), UMT5 text embeddings."""
    cfg = pipe.transformer.config

    def call():
        with pipe.transformer.cache_context(context):
            return pipe.transformer(
                hidden_states=_meta(rows, cfg.in_channels, frames, height, width), timestep=_meta(rows),
                encoder_hidden_states=_meta(rows, n_text, cfg.text_dim), attention_kwargs=None, return_dict=False,
            )

    return call


def wan_cfg_call(pipe, rows: int, frames: int = WAN_FRAMES, height: int = WAN_HEIGHT, width: int = WAN_WIDTH,
                 n_text: int = WAN_TEXT):
    """WanPipeline's step: with CFG (``guidance_scale > 1``, the default 5.0) a 1-row cond call under
    ``cache_context("cond")`` then a 1-row uncond call under ``cache_context("uncond")`` (``rows`` = 2); CFG off:
    the cond call alone (``rows`` = 1)."""
    return _separate_cfg(lambda p, r, context: wan_call(p, r, context, frames, height, width, n_text), pipe, rows, "Wan")


def diffusers_pag_regexes(layers) -> list[str]:
    """``pag_applied_layers`` selecting exactly the joint attention of ``transformer_blocks[i]`` for i in layers
    (anchored: diffusers' ids are unanchored regexes, "blocks.1" would also hit blocks 10-19)."""
    return [rf"transformer_blocks\.{i}\.attn$" for i in layers]


def _diffusers_pag_sd3(pipe, call, layers) -> tuple[int, dict]:
    """diffusers' layer-level PAG: its CFG processors on ``layers``, 3 rows ``[uncond, cond, perturbed]`` through
    every block (what ``StableDiffusion3PAGPipeline.__call__`` does per step); processors restored afterwards."""
    from diffusers import StableDiffusion3PAGPipeline

    names = inspect.signature(StableDiffusion3PAGPipeline.__init__).parameters
    pag = StableDiffusion3PAGPipeline(**{k: v for k, v in pipe.components.items() if k in names},
                                      pag_applied_layers=diffusers_pag_regexes(layers))
    original = dict(pag.transformer.attn_processors)
    pag._set_pag_attn_processor(pag_applied_layers=pag.pag_applied_layers, do_classifier_free_guidance=True)
    perturbed = [n for n, p in pag.transformer.attn_processors.items() if type(p).__name__.startswith("PAG")]
    assert len(perturbed) == len(layers), perturbed
    try:
        return _count(call(pag, 3))
    finally:
        pag.transformer.set_attn_processor(original)


def count_variant(pipe, call, n_base: int, spec: dict) -> tuple[int, dict]:
    """FLOPs of one guided step of variant ``spec`` (``kind``: "plain", "fused", "eager" or "diffusers"; ``heads``,
    ``mode``; ``layers`` for "diffusers") and its per-module totals."""
    kind = spec["kind"]
    if kind == "plain":
        return _count(call(pipe, n_base))
    if kind == "diffusers":
        return _diffusers_pag_sd3(pipe, call, spec["layers"])
    enable = headpag.enable_fused if kind == "fused" else headpag.enable_eager
    enable(pipe, spec["heads"], scale=SCALE, mode=spec.get("mode", "joint"))
    try:
        return _count(call(pipe, n_base))
    finally:
        headpag.disable(pipe)


def analyse(name: str, pipe, call, n_base: int, heads: str, n_tokens: int, with_diffusers: bool = False) -> dict:
    """Counts every contender of one guided step on ``pipe`` (a transformer pipeline; ``call(pipe, rows)`` makes
    the denoiser call) with ``heads`` selected (u=1, joint mode) and compares fused with the theoretical minimum.
    ``n_tokens``: the sequence length of the selected layers' attention (image + text tokens for joint attention,
    the video tokens for Wan's self-attention)."""
    model = pipe.transformer
    root = type(model).__name__
    units = forward_units(model)
    loops = tuple(dict.fromkeys(u.rsplit(".", 1)[0] for u in units))  # the module lists of the forward loop
    layers = list_layers(model)
    per_layer = defaultdict(int)  # selected heads per layer
    for item in heads.split(","):
        per_layer[int(item.split(":")[0])] += 1
    selected = sorted(per_layer)
    fork = min(units.index(layers[i].fork_unit) for i in selected)
    n_twin = 1  # one twin per cond row: SD3 [uncond, cond] + twin, Flux [cond] + twin, separate calls: cond + twin
    D = layers[selected[0]].head_dim
    N = n_tokens

    t0 = time.perf_counter()
    specs = {"cfg_only": dict(kind="plain"), "fused": dict(kind="fused", heads=heads), "eager": dict(kind="eager", heads=heads)}
    if with_diffusers:
        specs["diffusers_pag"] = dict(kind="diffusers", layers=selected)
    results, per_module = {}, {}
    for key, spec in specs.items():
        total, modules = count_variant(pipe, call, n_base, spec)
        results[key] = total
        per_module[key] = children(modules, root, loops)
    seconds = time.perf_counter() - t0
    cfg_total, cfg_children = results["cfg_only"], per_module["cfg_only"]

    minimum = _minimum(cfg_children, cfg_total, n_base, n_twin, units, fork, len(heads.split(",")), N, D, loops)
    results["minimum"] = minimum["flops"]
    identity_by_unit = defaultdict(int)
    for i, n_heads in per_layer.items():
        identity_by_unit[layers[i].fork_unit] += n_heads * n_twin * 4 * N * N * D
    excess = _excess(per_module["fused"], cfg_children, n_base, n_twin, units, fork, identity_by_unit)
    ratios = {f"{k}/cfg_only": v / cfg_total for k, v in results.items() if k != "cfg_only"}
    ratios["fused/minimum"] = results["fused"] / results["minimum"]
    return dict(
        model=name, model_class=root,
        base="CFG only: 2 rows [uncond, cond]" if n_base == 2 else "guidance only: 1 row [cond] (distilled guidance, no CFG)",
        config={k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")},
        heads=heads, selected_layers=selected, fork_unit=units[fork], n_base_rows=n_base, n_twin_rows=n_twin,
        tokens=N, head_dim=D, mode="joint", u=1.0,
        tflop={k: v / 1e12 for k, v in results.items()}, flops=results, ratios=ratios,
        minimum_parts=minimum, fused_excess_over_minimum=excess,
        fused_excess_total=sum(excess.values()), count_seconds=seconds,
    )


@torch.no_grad()
def hunt_candidate_flops(config: dict = SD3_MEDIUM) -> dict:
    """HeadHunter's cost per candidate image and step at SD3-medium 1024^2, CFG off (rows ``[cond]``): a batch of
    one candidate per layer (head 0 of each) with fused per-row head sets, each twin forking at its own layer,
    against one candidate at a time with a separate perturbed forward (the paper's way; the same FLOPs for every
    layer: the whole second forward)."""

    pipe = sd3_pipe(config)
    pipe._guidance_scale = 1.0
    n_layers = len(list_layers(pipe))
    counts = {}
    headpag.enable_fused(pipe, "0:0", scale=SCALE)
    try:
        headpag.set_row_heads(pipe, [headpag.HeadSet([(layer, 0)]) for layer in range(n_layers)])
        counts["fused_batched"] = _count(sd3_call(pipe, n_layers))[0] / n_layers
    finally:
        headpag.disable(pipe)
    counts["one_at_a_time"] = count_variant(pipe, sd3_call, 1, dict(kind="eager", heads=f"{n_layers // 2}:0"))[0]
    counts["unguided"] = _count(sd3_call(pipe, 1))[0]
    return {
        "per_candidate_image_step_tflop": {k: v / 1e12 for k, v in counts.items()},
        "one_at_a_time / fused_batched": counts["one_at_a_time"] / counts["fused_batched"],
        "fused_batched / unguided": counts["fused_batched"] / counts["unguided"],
        "note": f"{n_layers} candidates, one head in each layer; fused twins fork at their own layer; CFG off",
    }
