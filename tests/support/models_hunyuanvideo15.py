"""Tiny HunyuanVideo 1.5 pipelines (``HunyuanVideo15Pipeline``, ``HunyuanVideo15ImageToVideoPipeline``) built from
configs (random, seeded weights; no hub), the inputs of one call, and running them.

- :func:`transformer`: 2 ``HunyuanVideo15TransformerBlock`` of 2 heads of dim 8 (RoPE axes 2 + 2 + 4), patch 1, one
  token-refiner block; 16-dim Qwen text, 8-dim ByT5 text, 12-dim image-condition tokens. Image-to-video uses
  ``use_meanflow=True`` (the pipeline then passes ``timestep_r``).
- :func:`vae`: an ``AutoencoderKLHunyuanVideo15`` of :data:`Z_DIM` latent channels, 4x in time and space: 5 frames
  of 16x16 pixels are 2 latent frames of 4x4, i.e. 32 video tokens per row. The transformer takes latents + the
  conditioning latents + a mask: ``2 Z_DIM + 1`` channels.
- Text-to-video passes all-zero, fully masked image-condition tokens, 729 of them (the pipeline's
  ``vision_num_semantic_tokens``), cut to :data:`T2V_IMAGE_TOKENS` by default to keep the tests fast (masked zeros
  either way: the output is the same bit for bit); image-to-video the :data:`SIGLIP_TOKENS` tokens of a tiny SigLIP
  vision encoder.
  The joint sequence's text span is image-condition + ByT5 + Qwen tokens (:func:`n_text`), after the video tokens.

Text encoders are ``None``: prompt embeddings and masks (Qwen and ByT5, negatives too under CFG) are passed
directly, padded differently per prompt (:data:`VALID`, :data:`VALID_2`). The pipelines take no
``guidance_scale``: CFG is the pipeline's guider, so :func:`run` sets the ``guidance_scale`` of the inputs on
``pipe.guider`` (a new ``ClassifierFreeGuidance`` when it differs), CFG off at 1.0. Text-to-video repeats neither
the image-condition tokens nor given embeddings for ``num_videos_per_prompt`` (diffusers 0.42's text-to-video
fails with ``num_videos_per_prompt > 1``: its ``image_embeds`` have one row per prompt), so ``batch`` prompts x
``videos_per_prompt`` videos are passed as ``batch * videos_per_prompt`` embedding rows, each prompt's repeated
consecutively (the rows ``encode_prompt`` makes); image-to-video uses ``num_videos_per_prompt``.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from transformers import SiglipVisionConfig, SiglipVisionModel

try:  # transformers >= 5 without torchvision: the PIL backend, named (the generic name warns and falls back to it)
    from transformers import SiglipImageProcessorPil as SiglipImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import SiglipImageProcessor

HEADS = 2
HEAD_DIM = 8
LAYERS = 2
Z_DIM = 4  # latent channels
TEXT_DIM, TEXT_LEN = 16, 6  # Qwen2.5-VL embeddings
TEXT_2_DIM, TEXT_2_LEN = 8, 5  # ByT5 embeddings
IMAGE_DIM = 12  # image-condition tokens (SigLIP width)
REAL_T2V_IMAGE_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens: zeros, masked
T2V_IMAGE_TOKENS = 16  # the tests' default
SIGLIP_TOKENS = 4  # 16x16 image, 8x8 patches
VALID = (6, 4)  # valid Qwen tokens of prompt 0 / 1 (of TEXT_LEN)
VALID_2 = (3, 5)  # valid ByT5 tokens of prompt 0 / 1 (of TEXT_2_LEN)
NEGATIVE_VALID, NEGATIVE_VALID_2 = 2, 0  # the negative prompt's
FRAMES = 5  # -> 2 latent frames
SIZE = 16  # pixels -> 4x4 latents
VIDEO_TOKENS = 2 * 4 * 4


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def n_text(pipe) -> int:
    """Text tokens of the joint sequence of ``pipe``'s calls: image-condition + ByT5 + Qwen tokens."""
    image = SIGLIP_TOKENS if isinstance(pipe, HunyuanVideo15ImageToVideoPipeline) else pipe.vision_num_semantic_tokens
    return image + TEXT_2_LEN + TEXT_LEN


# --- models -------------------------------------------------------------------------------------------------------


def transformer(*, num_layers: int = LAYERS, heads: int = HEADS, head_dim: int = HEAD_DIM,
                use_meanflow: bool = False) -> HunyuanVideo15Transformer3DModel:
    axes = (2, 2, head_dim - 4)
    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * Z_DIM + 1, out_channels=Z_DIM, num_attention_heads=heads, attention_head_dim=head_dim,
        num_layers=num_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        text_embed_dim=TEXT_DIM, text_embed_2_dim=TEXT_2_DIM, image_embed_dim=IMAGE_DIM, rope_axes_dim=axes,
        target_size=SIZE, use_meanflow=use_meanflow,
    ).eval()


def vae() -> AutoencoderKLHunyuanVideo15:
    return AutoencoderKLHunyuanVideo15(latent_channels=Z_DIM, block_out_channels=(8, 8, 8), layers_per_block=1,
                                       spatial_compression_ratio=4, temporal_compression_ratio=4).eval()


def siglip() -> tuple[SiglipVisionModel, SiglipImageProcessor]:
    config = SiglipVisionConfig(hidden_size=IMAGE_DIM, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=2, image_size=SIZE, patch_size=8)
    return SiglipVisionModel(config).eval(), SiglipImageProcessor(size={"height": SIZE, "width": SIZE})


def guider(scale: float = 6.0, **kwargs) -> ClassifierFreeGuidance:
    """The checkpoints' guider: CFG at 6.0 (1.0 for the distilled ones)."""
    return ClassifierFreeGuidance(guidance_scale=scale, **kwargs)


# --- pipelines ------------------------------------------------------------------------------------------------------


def t2v(*, seed: int = 0, image_tokens: int = T2V_IMAGE_TOKENS) -> HunyuanVideo15Pipeline:
    """Text-to-video with ``image_tokens`` masked image-condition tokens per row."""
    torch.manual_seed(seed)
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer(), vae=vae(),
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=None,
                                  tokenizer_2=None, guider=guider())
    pipe.vision_num_semantic_tokens = image_tokens
    return _quiet(pipe)


def i2v(*, seed: int = 0) -> HunyuanVideo15ImageToVideoPipeline:
    """Image-to-video with a MeanFlow transformer (``timestep_r`` per row)."""
    torch.manual_seed(seed)
    image_encoder, feature_extractor = siglip()
    pipe = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer(use_meanflow=True), vae=vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=None, tokenizer_2=None,
        guider=guider(), image_encoder=image_encoder, feature_extractor=feature_extractor)
    return _quiet(pipe)


def _mask(valid, rows: int, length: int) -> torch.Tensor:
    mask = torch.zeros(rows, length)
    for row, n in enumerate(valid):
        mask[row, :n] = 1.0
    return mask


def inputs(pipe, *, batch: int = 2, videos_per_prompt: int = 1, cfg: float = 6.0, steps: int = 2, seed: int = 1,
           **extra) -> dict:
    """One call: ``batch`` prompts (padded per :data:`VALID` / :data:`VALID_2`) x ``videos_per_prompt`` videos of
    :data:`FRAMES` frames of :data:`SIZE` pixels, latent output; negative embeddings (one padding for every row)
    when ``cfg > 1``; the conditioning image for image-to-video."""
    image_to_video = isinstance(pipe, HunyuanVideo15ImageToVideoPipeline)
    repeat = 1 if image_to_video else videos_per_prompt

    def rows(t):
        return t.repeat_interleave(repeat, dim=0)

    kw = dict(prompt_embeds=rows(_embeds(seed, batch, TEXT_LEN, TEXT_DIM)),
              prompt_embeds_mask=rows(_mask(VALID[:batch], batch, TEXT_LEN)),
              prompt_embeds_2=rows(_embeds(seed + 1, batch, TEXT_2_LEN, TEXT_2_DIM)),
              prompt_embeds_mask_2=rows(_mask(VALID_2[:batch], batch, TEXT_2_LEN)),
              num_frames=FRAMES, num_inference_steps=steps, output_type="latent", guidance_scale=cfg)
    if cfg > 1:
        kw |= dict(negative_prompt_embeds=rows(_embeds(seed + 2, batch, TEXT_LEN, TEXT_DIM)),
                   negative_prompt_embeds_mask=rows(_mask([NEGATIVE_VALID] * batch, batch, TEXT_LEN)),
                   negative_prompt_embeds_2=rows(_embeds(seed + 3, batch, TEXT_2_LEN, TEXT_2_DIM)),
                   negative_prompt_embeds_mask_2=rows(_mask([NEGATIVE_VALID_2] * batch, batch, TEXT_2_LEN)))
    if image_to_video:
        kw |= dict(image=image(), num_videos_per_prompt=videos_per_prompt)
    else:
        kw |= dict(height=SIZE, width=SIZE)
    return kw | extra


def image(seed: int = 2) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


# --- running --------------------------------------------------------------------------------------------------------


def set_cfg(pipe, scale: float) -> None:
    """``pipe.guider`` at CFG scale ``scale`` (its other settings kept)."""
    if pipe.guider.guidance_scale != scale:
        pipe.guider = pipe.guider.new(guidance_scale=scale)


def run(pipe, inputs: dict, seed: int = 0) -> torch.Tensor:
    """``pipe(**inputs)`` with a freshly seeded generator and ``inputs["guidance_scale"]`` set on the guider: the
    latent video ``(B, C, F, H, W)``."""
    kw = dict(inputs)
    set_cfg(pipe, kw.pop("guidance_scale"))
    with torch.no_grad():
        return pipe(**kw, generator=torch.Generator().manual_seed(seed)).frames
