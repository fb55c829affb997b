"""A tiny HiDream-I1 pipeline built from configs (random seeded weights, no hub), and the inputs of one call.

``HiDreamImagePipeline`` takes four text encoders (two CLIPs, T5, Llama-3.1); all are ``None`` here: the pooled CLIP
embeddings, the T5 tokens and the Llama hidden-state stack are passed directly, negatives too under CFG, so
``encode_prompt`` never encodes (it only repeats them for ``num_images_per_prompt``).

The transformer: one double-stream block and two single-stream blocks of 2 heads of 16 (RoPE over the whole head:
axes 4 + 6 + 6), MoE feed-forward (4 routed experts, 2 active, plus the shared one). The Llama stack holds
``LLAMA_STACK`` = 3 layers (never a row count of these tests, so nothing can take its dim 0 for rows), read by the
blocks in the order ``LLAMA_LAYERS``. The pipeline works on 16x16 images: 8x8 latents of 4 channels (the tiny VAE's
scale factor is 2), 2x2 patches, so 16 image tokens; ``max_resolution`` (8, 8) lets a non-square image (16x8 pixels:
8 tokens) be padded to 16 tokens with ``hidden_states_masks``. Text: ``T5_LEN`` T5 tokens and ``LLAMA_LEN`` Llama
tokens, so ``N_TEXT = T5_LEN + 2 * LLAMA_LEN`` text tokens after the image tokens in every layer.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

from . import models as M

HEADS = 2
HEAD_DIM = 16
SIZE = 16  # pixels; 8x8 latents, 4x4 patches of 2x2
N_IMAGE = (SIZE // 4) ** 2
T5_LEN, T5_DIM = 5, 24
LLAMA_LEN, LLAMA_DIM = 3, 20
LLAMA_STACK = 3
LLAMA_LAYERS = [2, 0, 1]  # the stack layer read by double block 0, single block 0, single block 1
POOLED_DIM = 12
N_TEXT = T5_LEN + 2 * LLAMA_LEN
NO_TEXT_MODELS = {f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3", "_4")}

#: diffusers' scripts/convert_hidream_to_diffusers.py: HiDream-I1's transformer config (layout fields).
REAL_CONFIG = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
                   attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048,
                   num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32),
                   max_resolution=(128, 128), llama_layers=list(range(32)) + [31] * 16)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def transformer(**overrides) -> HiDreamImageTransformer2DModel:
    config = dict(patch_size=2, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=HEAD_DIM,
                  num_attention_heads=HEADS, caption_channels=[T5_DIM, LLAMA_DIM], text_emb_dim=POOLED_DIM,
                  num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 6, 6), max_resolution=(8, 8),
                  llama_layers=LLAMA_LAYERS)
    return HiDreamImageTransformer2DModel(**{**config, **overrides}).eval()


def hidream(*, seed: int = 0) -> HiDreamImagePipeline:
    torch.manual_seed(seed)
    pipe = HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=M.vae(**M.SD3_VAE),
                                transformer=transformer(), **NO_TEXT_MODELS)
    # the pipeline rescales every requested size to the area of default_sample_size x VAE scale factor squared
    pipe.default_sample_size = SIZE // pipe.vae_scale_factor
    return M._quiet(pipe)


def hidream_inputs(*, prompts: int = 2, images_per_prompt: int = 1, cfg: float = 5.0, steps: int = 3,
                   height: int = SIZE, width: int = SIZE, seed: int = 1, **extra) -> dict:
    """One call: ``prompts`` prompts' embeddings (the pipeline repeats them ``images_per_prompt`` times), CFG on at
    ``cfg > 1`` (the negatives given then), latents out."""
    kw = dict(prompt_embeds_t5=_randn(seed, prompts, T5_LEN, T5_DIM),
              prompt_embeds_llama3=_randn(seed + 1, LLAMA_STACK, prompts, LLAMA_LEN, LLAMA_DIM),
              pooled_prompt_embeds=_randn(seed + 2, prompts, POOLED_DIM),
              num_images_per_prompt=images_per_prompt, guidance_scale=cfg, num_inference_steps=steps,
              height=height, width=width, output_type="latent")
    if cfg > 1:
        kw.update(negative_prompt_embeds_t5=_randn(seed + 3, prompts, T5_LEN, T5_DIM),
                  negative_prompt_embeds_llama3=_randn(seed + 4, LLAMA_STACK, prompts, LLAMA_LEN, LLAMA_DIM),
                  negative_pooled_prompt_embeds=_randn(seed + 5, prompts, POOLED_DIM))
    return kw | extra
