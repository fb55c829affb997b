"""Tiny Lumina2 pipelines built from configs (random seeded weights, no hub) and the inputs of one call.

Text encoder and tokenizer are ``None``: prompt embeddings and their masks (negative ones too under CFG) are passed
directly. The VAE is unused (latent output; the pipeline fixes its scale factor at 8): 64x64 images give 8x8 latents
of 4 channels, 2x2 patches: 16 image tokens; captions of 6 tokens whose last
``TEXT_LEN - EFFECTIVE`` are padding (mask 0), so the joint sequence holds :data:`EFFECTIVE` text tokens.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

from . import models as M
from .models_auraflow import redraw_linear_weights

HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
LAYERS = 3
REFINERS = 1
TEXT_DIM = 16
TEXT_LEN = 6
EFFECTIVE = 4
SIZE = 64  # Lumina2Pipeline fixes vae_scale_factor = 8: 8x8 latents
LATENT = 4


def transformer() -> Lumina2Transformer2DModel:
    """:data:`REFINERS` + :data:`REFINERS` refiner blocks and :data:`LAYERS` main blocks of :data:`HEADS` heads
    (:data:`KV_HEADS` K/V heads) of :data:`HEAD_DIM`, linear weights redrawn
    (:func:`support.models_auraflow.redraw_linear_weights`)."""
    return redraw_linear_weights(Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=LATENT, hidden_size=HEADS * HEAD_DIM, num_layers=LAYERS,
        num_refiner_layers=REFINERS, num_attention_heads=HEADS, num_kv_heads=KV_HEADS, multiple_of=16,
        axes_dim_rope=(4, 2, 2), axes_lens=(64, 32, 32), cap_feat_dim=TEXT_DIM).eval())


def pipeline(*, seed: int = 0) -> Lumina2Pipeline:
    torch.manual_seed(seed)
    pipe = Lumina2Pipeline(tokenizer=None, text_encoder=None, vae=M.vae(), transformer=transformer(),
                           scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mask(rows: int, lengths: list[int] | None = None) -> torch.Tensor:
    """Caption masks: the first ``lengths[i]`` (default :data:`EFFECTIVE`) tokens of row ``i`` are real."""
    out = torch.zeros(rows, TEXT_LEN, dtype=torch.long)
    for i, n in enumerate(lengths or [EFFECTIVE] * rows):
        out[i, :n] = 1
    return out


def inputs(*, prompts: int = 2, images_per_prompt: int = 2, guidance_scale: float = 4.0, steps: int = 2,
           lengths: list[int] | None = None, negative_lengths: list[int] | None = None, **extra) -> dict:
    """``prompts`` x ``images_per_prompt`` images from seeded prompt embeddings with masks of ``lengths`` real
    tokens (all :data:`EFFECTIVE` by default). Under CFG the pipeline does not repeat given negative embeddings per
    image (and cannot encode a negative prompt without a text encoder), so the prompt embeddings are given already
    repeated per image (the rows ``num_images_per_prompt`` would make) with ``num_images_per_prompt=1``, and the
    negative ones (``negative_lengths``) with one row per image; without CFG the pipeline repeats them itself."""
    g = torch.Generator().manual_seed(1)
    embeds, masks = torch.randn(prompts, TEXT_LEN, TEXT_DIM, generator=g), mask(prompts, lengths)
    call = dict(guidance_scale=guidance_scale, num_inference_steps=steps, height=SIZE, width=SIZE,
                output_type="latent", **extra)
    if guidance_scale > 1:
        rows = prompts * images_per_prompt
        call.update(prompt_embeds=embeds.repeat_interleave(images_per_prompt, 0),
                    prompt_attention_mask=masks.repeat_interleave(images_per_prompt, 0), num_images_per_prompt=1,
                    negative_prompt_embeds=torch.randn(rows, TEXT_LEN, TEXT_DIM, generator=g),
                    negative_prompt_attention_mask=mask(rows, negative_lengths))
    else:
        call.update(prompt_embeds=embeds, prompt_attention_mask=masks, num_images_per_prompt=images_per_prompt)
    return call
