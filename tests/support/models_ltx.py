"""Tiny LTX-Video pipelines (``LTXPipeline``, ``LTXImageToVideoPipeline``, ``LTXConditionPipeline``) built from configs
(random, seeded weights; no hub), and their run helpers.

- :func:`ltx_transformer`: 2 ``LTXVideoTransformerBlock`` of 2 heads of dim 8, 16-dim text (diffusers' own test
  sizes).
- :func:`ltx_vae`: an ``AutoencoderKLLTXVideo`` with LTX-Video 0.9.0's layout (three spatio-temporal down blocks,
  4x4 patches: 32x in space, 8x in time) with 8-channel blocks and 4 latent channels: 9 frames of 64x64 are 2 latent
  frames of 2x2, 8 video tokens per row.
- The pipelines take no text encoder or tokenizer: prompt embeddings ``(B, T, 16)`` and their (right-padded, T5's)
  masks are passed directly; ``output_type="latent"`` decodes nothing (image conditions are encoded).

The pipelines repeat given embeddings neither for ``num_videos_per_prompt`` nor otherwise, so ``batch`` prompts with
``videos_per_prompt`` videos each are passed as ``batch * videos_per_prompt`` rows, each prompt's repeated
consecutively.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXConditionPipeline,
    LTXImageToVideoPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)


HEADS = 2
HEAD_DIM = 8
LAYERS = 2
TEXT_DIM = 16
TEXT_LEN = 6
FRAMES = 9  # -> 2 latent frames
SIZE = 64  # pixels -> 2x2 latents
VIDEO_TOKENS = 2 * 2 * 2


def ltx_transformer(*, num_layers: int = LAYERS, heads: int = HEADS, head_dim: int = HEAD_DIM
                    ) -> LTXVideoTransformer3DModel:
    return LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=heads,
        attention_head_dim=head_dim, cross_attention_dim=heads * head_dim, num_layers=num_layers,
        caption_channels=TEXT_DIM,
    ).eval()


def ltx_vae() -> AutoencoderKLLTXVideo:
    return AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=4,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()


PIPELINES = {"t2v": LTXPipeline, "i2v": LTXImageToVideoPipeline, "condition": LTXConditionPipeline}


def ltx(kind: str = "t2v", *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The pipeline of ``kind`` (:data:`PIPELINES`), its transformer and VAE in ``dtype``."""
    torch.manual_seed(seed)
    pipe = PIPELINES[kind](scheduler=FlowMatchEulerDiscreteScheduler(), vae=ltx_vae().to(dtype), text_encoder=None,
                           tokenizer=None, transformer=ltx_transformer().to(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text_mask(rows: int, lengths: list[int] | None = None) -> torch.Tensor:
    """A right-padded mask: row ``i`` has its first ``lengths[i % len]`` tokens (all by default)."""
    mask = torch.zeros(rows, TEXT_LEN, dtype=torch.long)
    for i in range(rows):
        mask[i, :TEXT_LEN if lengths is None else lengths[i % len(lengths)]] = 1
    return mask


def image(seed: int = 2) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def ltx_inputs(kind: str = "t2v", *, batch: int = 1, videos_per_prompt: int = 1, cfg: float = 3.0, steps: int = 2,
               seed: int = 1, lengths: list[int] | None = None, dtype: torch.dtype = torch.float32, **extra) -> dict:
    """One call of the ``kind`` pipeline: ``batch`` prompts x ``videos_per_prompt`` videos of :data:`FRAMES` frames of
    :data:`SIZE` pixels, latent output; negative embeddings when ``cfg > 1``; ``lengths``: the prompts' token counts.
    Image-to-video conditions on an image; the condition pipeline on an image at frame 0 (``condition=False``: none,
    text-only)."""
    rows = batch * videos_per_prompt

    def emb(s):
        return _embeds(s, batch, TEXT_LEN, TEXT_DIM).repeat_interleave(videos_per_prompt, dim=0).to(dtype)

    kw = dict(prompt_embeds=emb(seed), prompt_attention_mask=text_mask(rows, lengths), num_inference_steps=steps,
              height=SIZE, width=SIZE, num_frames=FRAMES, guidance_scale=cfg, output_type="latent")
    if cfg > 1:
        kw |= dict(negative_prompt_embeds=emb(seed + 1), negative_prompt_attention_mask=text_mask(rows, lengths))
    if kind == "i2v":
        kw["image"] = image()
    if kind == "condition" and extra.pop("condition", True):
        kw |= dict(image=image(), frame_index=0, strength=1.0)
    return kw | extra


def run(pipe, inputs: dict, seed: int = 0) -> torch.Tensor:
    """``pipe(**inputs)`` with a freshly seeded generator: the latent video."""
    with torch.no_grad():
        return pipe(**inputs, generator=torch.Generator().manual_seed(seed)).frames


def guided(pipe, execution: str, heads, inputs: dict, **settings) -> torch.Tensor:
    """:func:`support.checks.guided` with this family's :func:`run`."""
    from .checks import guided as guided_run

    return guided_run(pipe, execution, heads, inputs, run=run, **settings)
