"""Tiny CogView4 pipelines (``CogView4Pipeline``, ``CogView4ControlPipeline``) built from configs (random seeded
weights, no hub) and the inputs of one call.

Text encoder and tokenizer are ``None``: prompt embeddings (and negative ones under CFG) are passed directly. The
VAE has two levels (2x compression) and is only used for its scale factor (latent output); 16x16 images give 8x8
latents of 4 channels, 2x2 patches: 16 image tokens; 5 text tokens (8 for the negative prompt of the text-to-image
pipeline; the control pipeline wants both of one shape).
"""

from __future__ import annotations

import torch
from diffusers import (
    CogView4ControlPipeline,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from . import models as M

HEADS = 4
HEAD_DIM = 8
LAYERS = 3
TEXT_DIM = 16
TEXT_LEN = 5
NEG_LEN = 8
SIZE = 16
LATENT = 4

PIPELINES = {"t2i": CogView4Pipeline, "control": CogView4ControlPipeline}


def transformer(*, in_channels: int = LATENT) -> CogView4Transformer2DModel:
    """:data:`LAYERS` blocks of :data:`HEADS` heads of :data:`HEAD_DIM`; 16-dim text."""
    return CogView4Transformer2DModel(patch_size=2, in_channels=in_channels, out_channels=LATENT, num_layers=LAYERS,
                                      attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, text_embed_dim=TEXT_DIM,
                                      time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8,
                                      rope_axes_dim=(16, 16)).eval()


def _deterministic_encode(vae):
    """``CogView4ControlPipeline`` encodes the control image with ``latent_dist.sample()`` without a generator (a
    fresh draw from torch's global RNG every call): make this VAE's posterior deterministic (its mean), so that
    runs are reproducible."""
    encode = vae.encode

    def deterministic(x, return_dict: bool = True):
        dist = DiagonalGaussianDistribution(encode(x).latent_dist.parameters, deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    vae.encode = deterministic
    return vae


def pipeline(kind: str = "t2i", *, seed: int = 0):
    """A fresh pipeline of :data:`PIPELINES` ``[kind]`` (the control one's transformer takes the noisy and the
    control latents stacked on channels)."""
    torch.manual_seed(seed)
    den = transformer(in_channels=2 * LATENT if kind == "control" else LATENT)
    vae = _deterministic_encode(M.vae()) if kind == "control" else M.vae()
    pipe = PIPELINES[kind](tokenizer=None, text_encoder=None, vae=vae, transformer=den,
                           scheduler=FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75,
                                                                     base_image_seq_len=256, use_dynamic_shifting=True,
                                                                     time_shift_type="linear"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(kind: str = "t2i", *, prompts: int = 2, images_per_prompt: int = 2, guidance_scale: float = 5.0,
           steps: int = 2) -> dict:
    """``prompts`` x ``images_per_prompt`` images. Under CFG the pipeline wants negative embeddings of the prompt
    embeddings' batch and does not repeat them per image (and cannot encode a negative prompt without a text
    encoder), so the prompt embeddings are given already repeated per image (the rows ``num_images_per_prompt``
    would make) with ``num_images_per_prompt=1``; without CFG the pipeline repeats them itself."""
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(prompts, TEXT_LEN, TEXT_DIM, generator=g)
    call = dict(guidance_scale=guidance_scale, num_inference_steps=steps, height=SIZE, width=SIZE,
                output_type="latent")
    if guidance_scale > 1:
        call.update(prompt_embeds=embeds.repeat_interleave(images_per_prompt, 0), num_images_per_prompt=1,
                    negative_prompt_embeds=torch.randn(prompts * images_per_prompt,
                                                       TEXT_LEN if kind == "control" else NEG_LEN, TEXT_DIM,
                                                       generator=g))
    else:
        call.update(prompt_embeds=embeds, num_images_per_prompt=images_per_prompt)
    if kind == "control":
        call["control_image"] = torch.rand(1, 3, SIZE, SIZE, generator=g)
    return call
