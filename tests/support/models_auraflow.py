"""Tiny AuraFlow pipelines built from configs (random seeded weights, no hub) and the inputs of one call.

Text encoder and tokenizer are ``None``: prompt embeddings and their masks (negative ones too under CFG) are passed
directly. The VAE has two levels (2x compression) and is only used for its scale factor (latent output): 16x16
images give 8x8 latents of 4 channels, 2x2 patches: 16 image tokens; 5 text tokens, after the model's 8 register
tokens.
"""

from __future__ import annotations

import torch
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

from . import models as M

HEADS = 4
HEAD_DIM = 8
MMDIT = 2
SINGLE = 2
LAYERS = MMDIT + SINGLE
TEXT_DIM = 16
TEXT_LEN = 5
REGISTER = 8
SIZE = 16
LATENT = 4


def redraw_linear_weights(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every linear weight redrawn with std ``1 / sqrt(fan_in)`` (seeded by the caller's global seed):
    diffusers' default init leaves the tiny AuraFlow and Lumina2 models nearly insensitive to their attention
    (guidance moves the output by ~1e-3)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5)
    return model


def transformer() -> AuraFlowTransformer2DModel:
    """:data:`MMDIT` joint + :data:`SINGLE` single blocks of :data:`HEADS` heads of :data:`HEAD_DIM`, linear weights
    redrawn (:func:`redraw_linear_weights`)."""
    return redraw_linear_weights(AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=LATENT, num_mmdit_layers=MMDIT, num_single_dit_layers=SINGLE,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM,
        caption_projection_dim=HEADS * HEAD_DIM, out_channels=LATENT, pos_embed_max_size=64).eval())


def pipeline(*, seed: int = 0) -> AuraFlowPipeline:
    torch.manual_seed(seed)
    pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=M.vae(), transformer=transformer(),
                            scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(*, prompts: int = 2, images_per_prompt: int = 2, guidance_scale: float = 3.5, steps: int = 2) -> dict:
    """``prompts`` seeded prompt embeddings (all-ones masks), negative ones under CFG, ``images_per_prompt`` each."""
    g = torch.Generator().manual_seed(1)
    ones = torch.ones(prompts, TEXT_LEN, dtype=torch.long)
    call = dict(prompt_embeds=torch.randn(prompts, TEXT_LEN, TEXT_DIM, generator=g), prompt_attention_mask=ones,
                guidance_scale=guidance_scale, num_inference_steps=steps, height=SIZE, width=SIZE,
                num_images_per_prompt=images_per_prompt, output_type="latent")
    if guidance_scale > 1:
        call.update(negative_prompt_embeds=torch.randn(prompts, TEXT_LEN, TEXT_DIM, generator=g),
                    negative_prompt_attention_mask=ones)
    return call
