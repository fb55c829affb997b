"""Tiny Z-Image pipelines built from configs (random, seeded weights; no hub, no text encoder).

:func:`zimage_transformer`: one noise-refiner and one context-refiner block, then 2 main blocks (the layers),
2 heads of dim 16 (RoPE axes 4 + 6 + 6), 4 latent channels, 2x2 patches, 16-dim caption features. The pipelines
share a tiny ``AutoencoderKL`` (vae_scale_factor 2): a 16x16 image is an 8x8 latent, 16 image tokens padded to 32.
Prompt embeddings are lists of ``(L_i, 16)`` tensors passed directly (Z-Image encodes with Qwen3); the default
lengths differ but all pad to 32 caption tokens, so the model needs no attention mask.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImageImg2ImgPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)

CAP_DIM = 16
#: raw prompt lengths of the default inputs (positive, negative): different, but all pad to 32 caption tokens
PROMPT_LENGTHS = (5, 9, 12, 3)
NEGATIVE_LENGTHS = (7, 2, 4, 11)


def zimage_transformer(*, n_layers: int = 2, n_refiner_layers: int = 1, heads: int = 2) -> ZImageTransformer2DModel:
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16 * heads, n_layers=n_layers,
        n_refiner_layers=n_refiner_layers, n_heads=heads, n_kv_heads=heads, qk_norm=True, cap_feat_dim=CAP_DIM,
        axes_dims=[4, 6, 6], axes_lens=[128, 32, 32],
    ).eval()


def _vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=4, layers_per_block=1,
                         scaling_factor=1.5, shift_factor=0.06).eval()


def _components(seed: int) -> dict:
    torch.manual_seed(seed)
    transformer = zimage_transformer()
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=None, tokenizer=None,
                transformer=transformer)


def zimage(*, seed: int = 0) -> ZImagePipeline:
    pipe = ZImagePipeline(**_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def zimage_img2img(*, seed: int = 0) -> ZImageImg2ImgPipeline:
    pipe = ZImageImg2ImgPipeline(**_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _captions(seed: int, lengths) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, CAP_DIM, generator=g) for n in lengths]


def zimage_inputs(*, batch: int = 1, num_images_per_prompt: int = 1, cfg: float = 4.0, steps: int = 3, seed: int = 1,
                  lengths=PROMPT_LENGTHS, negative_lengths=NEGATIVE_LENGTHS, **extra) -> dict:
    """``batch`` prompts of ``lengths`` tokens, ``num_images_per_prompt`` images each; ``cfg > 0`` is CFG with
    negative prompts of ``negative_lengths`` tokens (Z-Image's CFG is on for guidance_scale > 0)."""
    kw = dict(prompt_embeds=_captions(seed, lengths[:batch]), num_images_per_prompt=num_images_per_prompt,
              guidance_scale=cfg, num_inference_steps=steps, height=16, width=16, output_type="latent")
    if cfg > 0:
        kw["negative_prompt_embeds"] = _captions(seed + 1, negative_lengths[:batch])
    return kw | extra


def img2img_inputs(**kwargs) -> dict:
    """:func:`zimage_inputs` plus a seeded 16x16 image per prompt, strength 0.7."""
    kw = zimage_inputs(**kwargs)
    batch = len(kw["prompt_embeds"])
    image = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return kw | dict(image=image, strength=0.7)
