"""Tiny FLUX.2 pipelines built from configs (random, seeded weights; no hub, no text encoder).

- :func:`flux2_transformer`: one double-stream and two single-stream blocks (layers 0, 1, 2 of one index space),
  2 heads of dim 16, 16 input channels (4 latent channels patchified 2x2), RoPE over 4 axes of 4.
- :func:`flux2` (``Flux2Pipeline``, FLUX.2-dev-like: guidance embedding, no CFG) and :func:`klein`
  (``Flux2KleinPipeline``: no guidance embedding, true CFG in a second call) share the tiny ``AutoencoderKLFlux2``
  (two levels: vae_scale_factor 2). Prompt embeddings are passed directly (``text_encoder=None``; FLUX.2 encodes
  with Mistral-3, klein with Qwen3). 8x8 images: 4x4 latents, 2x2 packed = 4 image tokens; 5 text tokens.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLFlux2,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)

TEXT_LEN = 5
TEXT_DIM = 24


def flux2_transformer(*, guidance_embeds: bool = True, num_layers: int = 1, num_single_layers: int = 2,
                      heads: int = 2, head_dim: int = 16) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=TEXT_DIM,
        timestep_guidance_channels=32, axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=guidance_embeds,
    ).eval()


def flux2_vae() -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        sample_size=16,
    ).eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux2(*, seed: int = 0) -> Flux2Pipeline:
    torch.manual_seed(seed)
    transformer = flux2_transformer(guidance_embeds=True)
    return _quiet(Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(), text_encoder=None,
                                tokenizer=None, transformer=transformer))


def klein(*, seed: int = 0) -> Flux2KleinPipeline:
    torch.manual_seed(seed)
    transformer = flux2_transformer(guidance_embeds=False)
    return _quiet(Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(), text_encoder=None,
                                     tokenizer=None, transformer=transformer))


def _embeds(seed: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def flux2_inputs(*, batch: int = 1, num_images_per_prompt: int = 1, guidance_scale: float = 4.0, steps: int = 3,
                 seed: int = 1, **extra) -> dict:
    """``Flux2Pipeline`` call: ``batch`` prompts (embeddings), ``num_images_per_prompt`` images each."""
    return dict(prompt_embeds=_embeds(seed, batch), num_images_per_prompt=num_images_per_prompt,
                guidance_scale=guidance_scale, num_inference_steps=steps, height=8, width=8,
                output_type="latent") | extra


def klein_inputs(*, batch: int = 1, num_images_per_prompt: int = 1, cfg: float = 4.0, steps: int = 3,
                 seed: int = 1, **extra) -> dict:
    """``Flux2KleinPipeline`` call; ``cfg > 1`` is true CFG with seeded negative embeddings."""
    kw = dict(prompt_embeds=_embeds(seed, batch), num_images_per_prompt=num_images_per_prompt, guidance_scale=cfg,
              num_inference_steps=steps, height=8, width=8, output_type="latent")
    if cfg > 1:
        kw["negative_prompt_embeds"] = _embeds(seed + 1, batch)
    return kw | extra
