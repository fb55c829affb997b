"""Full-size cost of one guided step without a GPU: FLOPs on the meta device (``FlopCounterMode``), no weights.

SD3-medium, FLUX.1-dev, FLUX.2-dev, Qwen-Image and Wan 2.1 T2V-14B through ``meta_flops`` (real
``StableDiffusion3Pipeline`` / ``FluxPipeline`` / ``Flux2Pipeline`` / ``QwenImagePipeline`` / ``WanPipeline`` objects,
full-size configs written out in ``meta_flops``); SD1.5 and SDXL as full-size ``UNet2DConditionModel``s on the meta
device inside real ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` objects, each at its native
resolution. Per model, three head sets written out below (one early layer, a paper-like set of 24 heads mostly in
the first half of the layers, a style set spread over all layers), each with CFG on (2 base rows) and CFG off
(1 base row, the setting HeadHunter searches in): plain forward (1 row, no guidance), CFG-only step (the base
rows), eager, fused, and the theoretical minimum (base rows through everything, plus the twin row from the fork
unit on, minus the attention skipped by identity heads; the same fork units as the code). FLUX.1-dev: distilled
guidance (1 row) and true CFG (a cond and an uncond call); FLUX.2-dev: distilled guidance only; Qwen-Image (true
CFG) and Wan (CFG): a 1-row cond call and a 1-row uncond call per step under ``cache_context("cond")`` /
``("uncond")``, or the cond call alone with CFG off. Each count carries the roofline projection of its H100 time
(``roofline.py``).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from . import meta_flops, roofline
from .meta_flops import STEPS

# SD1.5 (runwayml/stable-diffusion-v1-5 unet/config.json) and SDXL base 1.0 (unet/config.json).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SD15_LATENT, SD15_TEXT = 64, 77  # 512x512
SDXL_LATENT, SDXL_TEXT = 128, 77  # 1024x1024


def _h(pairs) -> str:
    return ",".join(f"{layer}:{head}" for layer, head in pairs)


# Head sets per model, written out. "L:*" is expanded to every head of layer L (the minimum counts heads).
# SD3-medium: 24 layers x 24 heads. FLUX.1-dev: 19 double + 38 single = 57 layers x 24 heads.
# SD1.5: 16 self-attention layers x 8 heads (down 0-5, mid 6, up 7-15). SDXL: 70 layers (down 0-23, mid 24-33,
# up 34-69), 10 heads in down_blocks.1 / up_blocks.1 (layers 0-3, 64-69), 20 elsewhere. FLUX.2-dev: 8 double +
# 48 single = 56 layers x 48 heads. Qwen-Image: 60 layers x 24 heads. Wan 2.1 T2V-14B: 40 self-attention layers x
# 40 heads.
HEAD_SETS = {
    "SD3-medium": {
        "early": "1:*",
        "paper-like": _h([(layer, h) for layer in range(2, 12) for h in (layer % 24, (layer + 11) % 24)]
                         + [(14, 3), (16, 5), (18, 7), (20, 9)]),
        "style": _h([(layer, (5 * layer) % 24) for layer in range(24)]),
    },
    "FLUX.1-dev": {
        "early": "1:*",
        "paper-like": _h([(layer, h) for layer in range(2, 24, 2) for h in (layer % 24, (layer + 5) % 24)]
                         + [(40, 1), (50, 2)]),
        "style": _h([(layer, (7 * layer) % 24) for layer in range(0, 57, 2)][:24] + [(56, 0)]),
    },
    "FLUX.2-dev": {
        "early": "1:*",
        "paper-like": _h([(layer, h) for layer in range(2, 24, 2) for h in (layer % 48, (layer + 17) % 48)]
                         + [(40, 5), (50, 9)]),
        "style": _h([(layer, (7 * layer) % 48) for layer in range(0, 56, 2)] + [(55, 0)]),
    },
    "Qwen-Image": {
        "early": "1:*",
        "paper-like": _h([(layer, h) for layer in range(2, 24, 2) for h in (layer % 24, (layer + 7) % 24)]
                         + [(40, 1), (50, 2)]),
        "style": _h(sorted([(layer, (5 * layer) % 24) for layer in range(0, 60, 5)]
                           + [(layer, (5 * layer + 12) % 24) for layer in range(2, 60, 5)])),
    },
    "Wan2.1-T2V-14B": {
        "early": "1:*",
        "paper-like": _h([(layer, h) for layer in range(2, 13) for h in (layer % 40, (layer + 13) % 40)]
                         + [(24, 1), (32, 2)]),
        "style": _h(sorted([(layer, (7 * layer) % 40) for start in (0, 2, 4) for layer in range(start, 40, 5)])),
    },
    "SD1.5": {
        "early": "1:*",
        "paper-like": _h([(layer, h) for layer in range(0, 7) for h in (0, 3, 6)] + [(9, 1), (12, 2), (15, 4)]),
        "style": _h([(layer, (3 * layer) % 8) for layer in range(16)] + [(layer, (3 * layer + 4) % 8) for layer in range(0, 16, 2)]),
    },
    "SDXL": {
        "early": "1:*",
        "paper-like": _h([(layer, (3 * layer) % 10) for layer in range(0, 35, 2)] + [(40, 1), (46, 2), (52, 3),
                                                                                    (58, 4), (64, 5), (68, 6)]),
        "style": _h([(layer, (7 * layer) % 10) for layer in range(0, 70, 3)] + [(69, 9)]),
    },
}
QUICK = {"SD3-medium": ["paper-like"]}


def _expand(heads: str, layers) -> str:
    out = []
    for item in heads.split(","):
        layer, head = item.split(":")
        n = layers[int(layer)].heads
        out += [f"{layer}:{h}" for h in range(n)] if head == "*" else [item]
    for item in out:
        layer, head = map(int, item.split(":"))
        assert layer < len(layers) and head < layers[layer].heads, (item, len(layers))
    assert len(set(out)) == len(out), heads
    return ",".join(out)


# ---- UNets (SD1.5, SDXL) ----------------------------------------------------------------------------------------

def sd15_pipe(config: dict = SD15_UNET):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).eval()
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=PNDMScheduler(steps_offset=1, skip_prk_steps=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler.set_timesteps(STEPS)
    pipe._guidance_scale = 7.0
    return pipe


def sdxl_pipe(config: dict = SDXL_UNET):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).eval()
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.scheduler.set_timesteps(STEPS)
    pipe._guidance_scale = 7.0
    return pipe


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def unet_call(latent: int, n_text: int, sdxl: bool):
    def make(pipe, rows: int):
        cfg = pipe.unet.config

        def call():
            kwargs = {}
            if sdxl:
                kwargs["added_cond_kwargs"] = {"text_embeds": _meta(rows, 1280), "time_ids": _meta(rows, 6)}
            with torch.no_grad():
                return pipe.unet(_meta(rows, cfg.in_channels, latent, latent), _meta(rows),
                                 encoder_hidden_states=_meta(rows, n_text, cfg.cross_attention_dim),
                                 return_dict=False, **kwargs)

        return call

    return make


def _unet_tokens(model, unit: str, latent: int) -> int:
    """Image tokens of the self-attention in ``unit`` (down block i works at latent / 2**i)."""
    n_down = len(model.down_blocks)
    level = {"mid_block": n_down - 1}.get(unit)
    if level is None:
        kind, i = unit.split(".")
        level = int(i) if kind == "down_blocks" else n_down - 1 - int(i)
    side = latent // 2 ** level
    return side * side


def analyse_unet(name: str, pipe, call, n_base: int, heads: str, latent: int) -> dict:
    """``meta_flops.analyse`` for a UNet: the fork unit is a down/mid/up block, the units after it plus
    ``conv_norm_out``/``conv_out`` carry the twin row, and each identity head skips ``4 N^2 D`` at its own
    resolution (N image tokens of that block)."""
    from headpag import forward_units, list_layers

    model = pipe.unet
    root = type(model).__name__
    units = forward_units(model)
    layers = list_layers(model)
    per_layer = defaultdict(int)
    for item in heads.split(","):
        per_layer[int(item.split(":")[0])] += 1
    selected = sorted(per_layer)
    fork = min(units.index(layers[i].fork_unit) for i in selected)
    n_twin = 1
    t0 = time.perf_counter()
    specs = {"cfg_only": dict(kind="plain"), "fused": dict(kind="fused", heads=heads),
             "eager": dict(kind="eager", heads=heads)}
    results, per_module = {}, {}
    for key, spec in specs.items():
        total, modules = meta_flops.count_variant(pipe, call, n_base, spec)
        results[key] = total
        per_module[key] = meta_flops.children(modules, root, loops=("down_blocks", "up_blocks"))
    seconds = time.perf_counter() - t0
    cfg_total, cfg_children = results["cfg_only"], per_module["cfg_only"]
    per_row = {k: v / n_base for k, v in cfg_children.items()}
    post = ("conv_norm_out", "conv_out")
    twin_modules = set(units[fork:]) | set(post)
    after_fork = sum(per_row.get(u, 0) for u in twin_modules)
    identity_by_unit = defaultdict(int)
    for i, n_heads in per_layer.items():
        unit = layers[i].fork_unit
        N = _unet_tokens(model, unit, latent)
        identity_by_unit[unit] += n_heads * n_twin * 4 * N * N * layers[i].head_dim
    skipped = sum(identity_by_unit.values())
    results["minimum"] = int(round(cfg_total + n_twin * after_fork - skipped))
    excess = {}
    for mod in sorted(set(cfg_children) | set(per_module["fused"])):
        allowed = per_row.get(mod, 0) * (n_base + (n_twin if mod in twin_modules else 0)) - identity_by_unit.get(mod, 0)
        diff = per_module["fused"].get(mod, 0) - allowed
        if abs(diff) > 0.5:
            excess[mod] = int(round(diff))
    ratios = {f"{k}/cfg_only": v / cfg_total for k, v in results.items() if k != "cfg_only"}
    ratios["fused/minimum"] = results["fused"] / results["minimum"]
    return dict(
        model=name, model_class=root, heads=heads, selected_layers=selected, fork_unit=units[fork],
        n_base_rows=n_base, n_twin_rows=n_twin, mode="joint", u=1.0,
        tflop={k: v / 1e12 for k, v in results.items()}, flops=results, ratios=ratios,
        minimum_parts=dict(flops=results["minimum"], twin_row_after_fork=int(round(after_fork)), identity_skipped=skipped),
        fused_excess_over_minimum=excess, fused_excess_total=sum(excess.values()), count_seconds=seconds,
    )


# ---- the section --------------------------------------------------------------------------------------------

def models():
    """(name, pipe factory, call maker, denoiser attribute, cases, resolution, joint attention tokens or ``None`` for
    UNets). A case is ``{label: dict(n_base=base rows per step, guidance=the pipeline's guidance scale to set (CFG
    on when > 1) or None, call=a call maker replacing the model's)}``."""
    mf = meta_flops
    cfg = {"cfg_on": dict(n_base=2, guidance=7.0), "cfg_off": dict(n_base=1, guidance=1.0)}
    flux = {"distilled": dict(n_base=1), "true_cfg": dict(n_base=2, call=mf.flux_true_cfg_call)}
    qwen = {"true_cfg": dict(n_base=2), "cfg_off": dict(n_base=1)}
    wan = {"cfg_on": dict(n_base=2), "cfg_off": dict(n_base=1)}
    flux2_img, qwen_img = mf.FLUX2_SIDE ** 2, mf.QWEN_SIDE ** 2
    return [
        ("SD3-medium", lambda: mf.sd3_pipe(mf.SD3_MEDIUM), mf.sd3_call, "transformer", cfg,
         "1024x1024, 4096 image + 333 text tokens", 4096 + mf.SD3_TEXT),
        ("FLUX.1-dev", lambda: mf.flux_pipe(mf.FLUX_DEV), mf.flux_call, "transformer", flux,
         "1024x1024, 4096 image + 512 text tokens", 4096 + mf.FLUX_TEXT),
        ("FLUX.2-dev", mf.flux2_pipe, mf.flux2_call, "transformer", {"distilled": dict(n_base=1)},
         f"1024x1024, {flux2_img} image + {mf.FLUX2_TEXT} text tokens", flux2_img + mf.FLUX2_TEXT),
        ("Qwen-Image", mf.qwen_pipe, mf.qwen_true_cfg_call, "transformer", qwen,
         f"1328x1328, {qwen_img} image + {mf.QWEN_TEXT} text tokens", qwen_img + mf.QWEN_TEXT),
        ("Wan2.1-T2V-14B", mf.wan_pipe, mf.wan_cfg_call, "transformer", wan,
         f"832x480x81 frames, {mf.WAN_TOKENS} video tokens (self-attention) + {mf.WAN_TEXT} text tokens "
         "(cross-attention)", mf.WAN_TOKENS),
        ("SD1.5", sd15_pipe, unet_call(SD15_LATENT, SD15_TEXT, sdxl=False), "unet", cfg,
         "512x512, 64x64 latents, 77 text tokens", None),
        ("SDXL", sdxl_pipe, unet_call(SDXL_LATENT, SDXL_TEXT, sdxl=True), "unet", cfg,
         "1024x1024, 128x128 latents, 77 text tokens", None),
    ]


def run(quick: bool = False) -> dict:
    """Counts every model / head set / CFG case (``quick``: SD3-medium, one head set) plus HeadHunter's FLOPs per
    candidate (not in ``quick``). Returns ``{"results": [...], "hunt": ..., "seconds": ...}``."""
    from headpag import list_layers

    start = time.perf_counter()
    entries = []
    for name, make_pipe, model_call, attr, cases, resolution, n_tokens in models():
        if quick and name not in QUICK:
            continue
        pipe = make_pipe()
        params = sum(p.numel() for p in getattr(pipe, attr).parameters())
        layers = list_layers(pipe)
        sets = HEAD_SETS[name]
        plain, _ = meta_flops._count(model_call(pipe, 1))  # one row, no guidance: the same for every set and case
        for set_name in (QUICK[name] if quick else sets):
            heads = _expand(sets[set_name], layers)
            for case, spec in cases.items():
                if spec.get("guidance") is not None:
                    pipe._guidance_scale = spec["guidance"]
                n_base, call = spec["n_base"], spec.get("call", model_call)
                if n_tokens is not None:
                    result = meta_flops.analyse(f"{name} {resolution}", pipe, call, n_base, heads, n_tokens)
                else:
                    latent = SD15_LATENT if name == "SD1.5" else SDXL_LATENT
                    result = analyse_unet(f"{name} {resolution}", pipe, call, n_base, heads, latent)
                flops = dict(result["flops"], plain=plain)
                entries.append(dict(
                    model=name, resolution=resolution, head_set=set_name, case=case, n_heads=len(heads.split(",")),
                    heads=heads, selected_layers=result["selected_layers"], fork_unit=result["fork_unit"],
                    n_base_rows=n_base, parameters=params, flops=flops,
                    tflop={k: v / 1e12 for k, v in flops.items()},
                    ratios={"fused/minimum": flops["fused"] / flops["minimum"],
                            "fused/cfg_only": flops["fused"] / flops["cfg_only"],
                            "eager/cfg_only": flops["eager"] / flops["cfg_only"],
                            "eager/fused": flops["eager"] / flops["fused"],
                            "cfg_only/plain": flops["cfg_only"] / flops["plain"]},
                    within_2pct_of_minimum=flops["fused"] / flops["minimum"] <= 1.02,
                    fused_excess_over_minimum=result["fused_excess_over_minimum"],
                    roofline_h100_projection={k: roofline.project(flops[k], params)
                                              for k in ("plain", "cfg_only", "eager", "fused", "minimum")},
                    count_seconds=result["count_seconds"],
                ))
    hunt = None if quick else meta_flops.hunt_candidate_flops()
    return dict(scale=meta_flops.SCALE, mode="joint", u=1.0, results=entries, hunt=hunt,
                roofline_note=roofline.NOTE, seconds=time.perf_counter() - start)
