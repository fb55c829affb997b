"""Tiny diffusers pipelines built from configs (random, seeded weights; no hub, no text encoders).

Every factory returns a fresh pipeline (progress bar off) whose denoiser works on 8x8 latents; every ``*_inputs``
helper returns the keyword arguments of one call with seeded prompt embeddings (text encoders are ``None``, so
embeddings are passed directly, negatives too when CFG is on). :func:`run` calls a pipeline with a freshly seeded
generator, so two runs with the same inputs start from the same noise.

- :func:`sd3` (``StableDiffusion3Pipeline``): 3 joint blocks, 4 heads of dim 8. ``qk_norm=None`` by default so that
  diffusers' PAG processors (which skip the q/k norms) are exact peers; :func:`sd35` adds ``qk_norm="rms_norm"``
  and a dual-attention block 0 (SD3.5's ``attn2``).
- :func:`sd15` (``StableDiffusionPipeline``): ``layers_per_block=2`` so that ``down_blocks.0`` holds two
  ``(resnet, attention)`` pairs: a fork after ``attentions.0`` would meet ``resnets.1`` with an unwidened ``temb``
  (the fork-unit case of DESIGN.md / layers.py). Layers: ``down_blocks.0`` x2, ``mid_block``, ``up_blocks.1`` x3.
- :func:`sdxl` (``StableDiffusionXLPipeline``): ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) and two
  ``BasicTransformerBlock`` per ``Transformer2DModel`` (SDXL's ``transformer_layers_per_block=2``).
- :func:`dit` (``DiTPipeline``): learned sigma, rows ``[cond, uncond]``, class labels.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

HEADS = 4  # attention heads of every layer of every tiny model here
TEXT_LEN = 7  # prompt tokens


def _vae(**kwargs) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1, **kwargs,
    )


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- SD3 / SD3.5 -----------------------------------------------------------------------------------------------


def sd3(*, num_layers: int = 3, qk_norm: str | None = None, dual_attention_layers: tuple[int, ...] = (),
        seed: int = 0) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=HEADS, joint_attention_dim=32, caption_projection_dim=8 * HEADS, pooled_projection_dim=16,
        pos_embed_max_size=16, qk_norm=qk_norm, dual_attention_layers=dual_attention_layers,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(scaling_factor=1.5, shift_factor=0.06),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    return _quiet(pipe)


def sd35(**kwargs) -> StableDiffusion3Pipeline:
    """SD3.5-style: RMS q/k norms and a dual-attention (``attn2``) block 0."""
    return sd3(qk_norm="rms_norm", dual_attention_layers=(0,), **kwargs)


def sd3_inputs(*, batch: int = 1, cfg: float = 5.0, steps: int = 2, num_images_per_prompt: int = 1,
               seed: int = 1, **extra) -> dict:
    """SD3's ``encode_prompt`` repeats embeddings for ``num_images_per_prompt`` only when it encodes text itself
    (given ``prompt_embeds`` are passed through, so the pipeline fails on a batch mismatch). ``batch`` prompts with
    ``num_images_per_prompt`` images each are therefore given as ``batch * num_images_per_prompt`` embeddings, each
    prompt's repeated consecutively: the same rows ``encode_prompt`` would produce."""
    def emb(s, *shape):
        return _embeds(s, batch, *shape).repeat_interleave(num_images_per_prompt, dim=0)

    kw = dict(
        prompt_embeds=emb(seed, TEXT_LEN, 32), pooled_prompt_embeds=emb(seed + 1, 16),
        num_inference_steps=steps, height=16, width=16, guidance_scale=cfg, output_type="latent",
    )
    if cfg > 1:
        kw.update(negative_prompt_embeds=emb(seed + 2, TEXT_LEN, 32), negative_pooled_prompt_embeds=emb(seed + 3, 16))
    return kw | extra


# --- SD1.5 -----------------------------------------------------------------------------------------------------


def sd15(*, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        attention_head_dim=HEADS,  # legacy name: the number of heads
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _quiet(pipe)


def sd15_inputs(*, batch: int = 1, cfg: float = 5.0, steps: int = 2, num_images_per_prompt: int = 1,
                seed: int = 1, **extra) -> dict:
    kw = dict(
        prompt_embeds=_embeds(seed, batch, TEXT_LEN, 12), num_inference_steps=steps, height=16, width=16,
        guidance_scale=cfg, output_type="latent", num_images_per_prompt=num_images_per_prompt,
    )
    if cfg > 1:
        kw["negative_prompt_embeds"] = _embeds(seed + 2, batch, TEXT_LEN, 12)
    return kw | extra


# --- SDXL ------------------------------------------------------------------------------------------------------


def sdxl(*, seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=12, attention_head_dim=HEADS,
        transformer_layers_per_block=2, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=10 + 6 * 4,  # pooled dim 10 + 6 time ids * 4
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )
    return _quiet(pipe)


def sdxl_inputs(*, batch: int = 1, cfg: float = 5.0, steps: int = 2, num_images_per_prompt: int = 1,
                seed: int = 1, **extra) -> dict:
    kw = dict(
        prompt_embeds=_embeds(seed, batch, TEXT_LEN, 12), pooled_prompt_embeds=_embeds(seed + 1, batch, 10),
        num_inference_steps=steps, height=16, width=16, guidance_scale=cfg, output_type="latent",
        num_images_per_prompt=num_images_per_prompt,
    )
    if cfg > 1:
        kw.update(negative_prompt_embeds=_embeds(seed + 2, batch, TEXT_LEN, 12),
                  negative_pooled_prompt_embeds=_embeds(seed + 3, batch, 10))
    return kw | extra


# --- DiT -------------------------------------------------------------------------------------------------------


def dit(*, seed: int = 0) -> DiTPipeline:
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
        patch_size=2, norm_num_groups=4, num_embeds_ada_norm=1000,
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler(clip_sample=False))
    return _quiet(pipe)


def dit_inputs(*, batch: int = 1, cfg: float = 4.0, steps: int = 2, **extra) -> dict:
    # DiT has no latent output: "pt" decodes with the tiny VAE and returns a (B, 3, 16, 16) tensor.
    return dict(class_labels=[3, 7, 11][:batch], guidance_scale=cfg, num_inference_steps=steps, output_type="pt") | extra


# --- running and peers -----------------------------------------------------------------------------------------

FACTORIES = {"sd3": (sd3, sd3_inputs), "sd35": (sd35, sd3_inputs), "sd15": (sd15, sd15_inputs),
             "sdxl": (sdxl, sdxl_inputs), "dit": (dit, dit_inputs)}


def run(pipe, inputs: dict, seed: int = 0) -> torch.Tensor:
    """``pipe(**inputs)`` with a freshly seeded generator; the latents (SD family) or decoded samples (DiT)."""
    with torch.no_grad():
        out = pipe(**inputs, generator=torch.Generator().manual_seed(seed))
    images = out.images
    return images if isinstance(images, torch.Tensor) else torch.as_tensor(images)


def peer(pipe, cls, **kwargs):
    """A pipeline of class ``cls`` (e.g. diffusers' ``StableDiffusion3PAGPipeline``) sharing ``pipe``'s
    components (filtered by ``cls.__init__``'s signature: SD3 has optional components the PAG pipeline lacks)."""
    names = inspect.signature(cls.__init__).parameters
    return _quiet(cls(**{k: v for k, v in pipe.components.items() if k in names}, **kwargs))


def denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
