"""Every tiny diffusers model of the tests, each built in one function here (random, seeded weights; no hub).

Denoisers (``*_transformer``, :func:`unet`) and the VAE take keyword overrides, so that a test needing another shape
passes parameters instead of writing its own copy of a config. Pipeline factories return a fresh pipeline (progress
bar off) whose denoiser works on 8x8 latents (Flux: 2x2 packed, 16 channels); every ``*_inputs`` helper returns the
keyword arguments of one call with seeded prompt embeddings (text encoders are ``None``, so embeddings are passed
directly, negatives too when CFG is on). :func:`run` calls a pipeline with a freshly seeded generator, so two runs
with the same inputs start from the same noise.

- :func:`sd3` (``StableDiffusion3Pipeline``): 3 joint blocks, 4 heads of dim 8. ``qk_norm=None`` by default so that
  diffusers' PAG processors (which skip the q/k norms) are exact peers; :func:`sd35` adds ``qk_norm="rms_norm"``
  and a dual-attention block 0 (SD3.5's ``attn2``).
- :func:`sd15` (``StableDiffusionPipeline``): ``layers_per_block=2`` so that ``down_blocks.0`` holds two
  ``(resnet, attention)`` pairs: a fork after ``attentions.0`` would meet ``resnets.1`` with an unwidened ``temb``
  (the fork-unit case of headpag/archs/unet.py). Layers: ``down_blocks.0`` x2, ``mid_block``, ``up_blocks.1`` x3.
- :func:`sdxl` (``StableDiffusionXLPipeline``): ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) and two
  ``BasicTransformerBlock`` per ``Transformer2DModel`` (SDXL's ``transformer_layers_per_block=2``).
- :func:`sd15_controlnet` (``StableDiffusionControlNetPipeline``): per-row ControlNet residuals into the UNet.
- :func:`dit` (``DiTPipeline``): learned sigma, rows ``[cond, uncond]``, class labels.
- :func:`flux` (``FluxPipeline``): one double and two single blocks in one index space; true CFG makes separate
  cond and uncond calls.
- :func:`pixart` (``PixArtSigmaPipeline``): learned sigma, attention masks.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

HEADS = 4  # attention heads of every layer of the SD3, SD1.5, SDXL and DiT pipelines here
TEXT_LEN = 7  # prompt tokens
# The latents of SD3 and of the pipelines of the extra-input families (ControlNet, Flux, PixArt) are decoded with
# these; SD1.5, SDXL and DiT keep AutoencoderKL's defaults.
SD3_VAE = dict(scaling_factor=1.5, shift_factor=0.06)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- models -------------------------------------------------------------------------------------------------------


def vae(**overrides) -> AutoencoderKL:
    """Two 8-channel levels, 4 latent channels (RGB in and out)."""
    config = dict(in_channels=3, out_channels=3, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1)
    return AutoencoderKL(**{**config, **overrides}).eval()


def sd3_transformer(*, num_layers: int = 3, heads: int = HEADS, head_dim: int = 8, qk_norm: str | None = None,
                    dual_attention_layers: tuple[int, ...] = ()) -> SD3Transformer2DModel:
    """``num_layers`` joint blocks of ``heads`` heads of dim ``head_dim``; 32-dim text, 16-dim pooled projections."""
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=16, pos_embed_max_size=16, qk_norm=qk_norm, dual_attention_layers=dual_attention_layers,
    ).eval()


def flux_transformer() -> FluxTransformer2DModel:
    """One double block and two single blocks, 2 heads of dim 16, no guidance embedding (a "dev"-less Flux)."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ).eval()


def pixart_transformer() -> PixArtTransformer2DModel:
    """2 blocks of 2 heads of dim 8, learned sigma (8 output channels), 12-dim captions."""
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=16,
        sample_size=8, patch_size=2, caption_channels=12, norm_num_groups=4,
    ).eval()


def dit_transformer(*, heads: int = HEADS, num_layers: int = 3) -> DiTTransformer2DModel:
    """``num_layers`` blocks of ``heads`` heads of dim 8, learned sigma (8 output channels), 1000 classes."""
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=8, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=1000,
    ).eval()


# SD1.5's layout in small: cross-attention in the first down and the last up block.
SD15_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
                 norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                 attention_head_dim=HEADS)  # legacy name: the number of heads
# SDXL's: cross-attention in the second level, two transformer blocks per Transformer2DModel, text_time embedding.
SDXL_UNET = dict(SD15_UNET, layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=2,
                 addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=10 + 6 * 4)  # pooled dim 10 + 6 time ids * 4


def unet(**overrides) -> UNet2DConditionModel:
    """:data:`SD15_UNET` with ``overrides``."""
    return UNet2DConditionModel(**{**SD15_UNET, **overrides}).eval()


# --- SD3 / SD3.5 -----------------------------------------------------------------------------------------------


def sd3(*, num_layers: int = 3, qk_norm: str | None = None, dual_attention_layers: tuple[int, ...] = (),
        seed: int = 0) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    transformer = sd3_transformer(num_layers=num_layers, qk_norm=qk_norm, dual_attention_layers=dual_attention_layers)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(**SD3_VAE),
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


# --- SD1.5, SDXL, ControlNet -----------------------------------------------------------------------------------


def sd15(*, seed: int = 0, scheduler=None, text_encoder=None, tokenizer=None, **unet_overrides) -> StableDiffusionPipeline:
    """The SD1.5 pipeline; ``unet_overrides`` change :data:`SD15_UNET`. Without a ``scheduler``: DDIM with SD1.5's
    ``steps_offset=1``."""
    torch.manual_seed(seed)
    denoiser_ = unet(**unet_overrides)
    pipe = StableDiffusionPipeline(
        vae=vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=denoiser_,
        scheduler=scheduler or DDIMScheduler(clip_sample=False, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _quiet(pipe)


def _sd_inputs(*, width: int, pooled: int | None, batch: int, cfg: float, steps: int, num_images_per_prompt: int,
               seed: int, extra: dict) -> dict:
    """SD1.5 / SDXL call: ``width``-dim prompt embeddings, SDXL's ``pooled``-dim pooled ones."""
    kw = dict(prompt_embeds=_embeds(seed, batch, TEXT_LEN, width), num_inference_steps=steps, height=16, width=16,
              guidance_scale=cfg, output_type="latent", num_images_per_prompt=num_images_per_prompt)
    if pooled:
        kw["pooled_prompt_embeds"] = _embeds(seed + 1, batch, pooled)
    if cfg > 1:
        kw["negative_prompt_embeds"] = _embeds(seed + 2, batch, TEXT_LEN, width)
        if pooled:
            kw["negative_pooled_prompt_embeds"] = _embeds(seed + 3, batch, pooled)
    return kw | extra


def sd15_inputs(*, batch: int = 1, cfg: float = 5.0, steps: int = 2, num_images_per_prompt: int = 1,
                seed: int = 1, **extra) -> dict:
    return _sd_inputs(width=12, pooled=None, batch=batch, cfg=cfg, steps=steps,
                      num_images_per_prompt=num_images_per_prompt, seed=seed, extra=extra)


def sdxl(*, seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    denoiser_ = unet(**SDXL_UNET)
    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=denoiser_,
        scheduler=EulerDiscreteScheduler(),
    )
    return _quiet(pipe)


def sdxl_inputs(*, batch: int = 1, cfg: float = 5.0, steps: int = 2, num_images_per_prompt: int = 1,
                seed: int = 1, **extra) -> dict:
    return _sd_inputs(width=12, pooled=10, batch=batch, cfg=cfg, steps=steps,
                      num_images_per_prompt=num_images_per_prompt, seed=seed, extra=extra)


# The ControlNet pipeline's UNet, shared by its ControlNetModel (which has no up blocks and no sample size).
CONTROLNET_UNET = dict(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=SD15_UNET["down_block_types"],
                       cross_attention_dim=12, attention_head_dim=2, layers_per_block=2)


def sd15_controlnet(*, seed: int = 0) -> StableDiffusionControlNetPipeline:
    torch.manual_seed(seed)
    denoiser_ = unet(**CONTROLNET_UNET)
    controlnet = ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(8, 8), **CONTROLNET_UNET).eval()
    pipe = StableDiffusionControlNetPipeline(
        vae=vae(**SD3_VAE), text_encoder=None, tokenizer=None, unet=denoiser_, controlnet=controlnet,
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    return _quiet(pipe)


def controlnet_inputs(*, cfg: float = 5.0) -> dict:
    torch.manual_seed(1)
    return dict(prompt_embeds=torch.randn(2, 5, 12), negative_prompt_embeds=torch.randn(2, 5, 12),
                image=torch.rand(2, 3, 16, 16), num_inference_steps=2, height=16, width=16, guidance_scale=cfg,
                output_type="latent")


# --- DiT -------------------------------------------------------------------------------------------------------


def dit(*, seed: int = 0, heads: int = HEADS, num_layers: int = 3, clip_sample: bool = False) -> DiTPipeline:
    torch.manual_seed(seed)
    transformer = dit_transformer(heads=heads, num_layers=num_layers)
    pipe = DiTPipeline(transformer=transformer, vae=vae(), scheduler=DDIMScheduler(clip_sample=clip_sample))
    return _quiet(pipe)


def dit_inputs(*, batch: int = 1, cfg: float = 4.0, steps: int = 2, **extra) -> dict:
    # DiT has no latent output: "pt" decodes with the tiny VAE and returns a (B, 3, 16, 16) tensor.
    return dict(class_labels=[3, 7, 11][:batch], guidance_scale=cfg, num_inference_steps=steps, output_type="pt") | extra


# --- Flux ------------------------------------------------------------------------------------------------------


def flux(*, seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    transformer = flux_transformer()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(**SD3_VAE), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    return _quiet(pipe)


def flux_inputs(*, batch: int = 2, true_cfg_scale: float = 4.0, steps: int = 3) -> dict:
    """32x32 images: 2x2 packed latents of 16 channels, 4 image tokens; 6 text tokens."""
    torch.manual_seed(1)
    return dict(prompt_embeds=torch.randn(batch, 6, 32), pooled_prompt_embeds=torch.randn(batch, 24),
                negative_prompt_embeds=torch.randn(batch, 6, 32), negative_pooled_prompt_embeds=torch.randn(batch, 24),
                true_cfg_scale=true_cfg_scale, num_inference_steps=steps, height=32, width=32, output_type="latent")


# --- PixArt ----------------------------------------------------------------------------------------------------


def pixart(*, seed: int = 0) -> PixArtSigmaPipeline:
    torch.manual_seed(seed)
    transformer = pixart_transformer()
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae(**SD3_VAE), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    return _quiet(pipe)


def pixart_inputs(*, cfg: float = 4.5) -> dict:
    torch.manual_seed(1)
    mask = torch.ones(2, 5, dtype=torch.long)
    return dict(prompt_embeds=torch.randn(2, 5, 12), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(2, 5, 12), negative_prompt_attention_mask=mask, negative_prompt=None,
                num_inference_steps=3, height=16, width=16, guidance_scale=cfg, output_type="latent",
                use_resolution_binning=False)


# --- running and peers -----------------------------------------------------------------------------------------

FACTORIES = {"sd3": (sd3, sd3_inputs), "sd35": (sd35, sd3_inputs), "sd15": (sd15, sd15_inputs),
             "sdxl": (sdxl, sdxl_inputs), "dit": (dit, dit_inputs)}


def make(model: str, build: dict | None = None, **inputs) -> tuple:
    """``(pipe, inputs)``: a fresh pipeline of :data:`FACTORIES` ``[model]`` (factory keywords ``build``) and the
    keyword arguments of one call (input-helper keywords ``inputs``)."""
    factory, make_inputs = FACTORIES[model]
    return factory(**(build or {})), make_inputs(**inputs)


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
