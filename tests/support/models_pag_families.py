"""Tiny pipelines of the families diffusers has PAG pipelines for, beyond those of models.py: HunyuanDiT, Sana and
AnimateDiff (random, seeded weights; no hub; text encoders ``None``, prompt embeddings passed directly).

- :func:`hunyuandit` (``HunyuanDiTPipeline``): 6 blocks of 2 heads of dim 8, so that blocks 4 and 5 take the long
  skips of blocks 1 and 0; learned sigma; v1.1-style ``style`` / ``image_meta_size`` conditioning. No VAE: the
  pipeline then assumes diffusers' 8x latent scale, which is what its RoPE grid (``height // 8``) is built for.
  64x64 images: 8x8 latents, 4x4 = 16 image tokens; text 5 (CLIP/BERT) + 6 (T5) tokens, with padded tails in the
  text masks.
- :func:`sana` (``SanaPipeline``): 2 blocks of 2 linear-attention heads of dim 8.
- :func:`animatediff` (``AnimateDiffPipeline``): SD1.5's UNet layout in small (see models.py) with a motion
  adapter; 3 frames of 8x8 latents.
"""

from __future__ import annotations

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderDC,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
    MotionAdapter,
    SanaPipeline,
    SanaTransformer2DModel,
)

from .models import _quiet, unet, vae

# --- HunyuanDiT ----------------------------------------------------------------------------------------------------

HUNYUAN_TEXT_LEN, HUNYUAN_T5_LEN = 5, 6


def hunyuandit_transformer(*, num_layers: int = 6, style_cond: bool = True) -> HunyuanDiT2DModel:
    """``num_layers`` blocks of 2 heads of dim 8; 12-dim CLIP/BERT and 16-dim T5 embeddings (the T5 pooler has 8
    heads); learned sigma. ``style_cond``: v1.0/v1.1's ``style`` and ``image_meta_size`` conditioning (v1.2 has
    none)."""
    return HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
        num_layers=num_layers, cross_attention_dim=12, cross_attention_dim_t5=16, pooled_projection_dim=8,
        text_len=HUNYUAN_TEXT_LEN, text_len_t5=HUNYUAN_T5_LEN, use_style_cond_and_image_meta_size=style_cond,
    ).eval()


def hunyuandit(*, seed: int = 0, num_layers: int = 6, style_cond: bool = True) -> HunyuanDiTPipeline:
    torch.manual_seed(seed)
    transformer = hunyuandit_transformer(num_layers=num_layers, style_cond=style_cond)
    pipe = HunyuanDiTPipeline(vae=None, text_encoder=None, tokenizer=None, transformer=transformer,
                              scheduler=DDPMScheduler(clip_sample=False, prediction_type="v_prediction", steps_offset=1), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None)
    return _quiet(pipe)


def _mask(rows: int, length: int, valid: int) -> torch.Tensor:
    mask = torch.zeros(rows, length, dtype=torch.long)
    mask[:, :valid] = 1
    return mask


def hunyuandit_inputs(*, batch: int = 2, cfg: float = 5.0, steps: int = 2, num_images_per_prompt: int = 1,
                      seed: int = 1, **extra) -> dict:
    """``batch`` prompts x ``num_images_per_prompt``. The pipeline repeats given embeddings per image but not given
    masks, so the masks come with one row per image already."""
    g = torch.Generator().manual_seed(seed)
    rows = batch * num_images_per_prompt

    def embeds(length, width):
        return torch.randn(batch, length, width, generator=g)

    kw = dict(
        prompt_embeds=embeds(HUNYUAN_TEXT_LEN, 12), prompt_attention_mask=_mask(rows, HUNYUAN_TEXT_LEN, 3),
        prompt_embeds_2=embeds(HUNYUAN_T5_LEN, 16), prompt_attention_mask_2=_mask(rows, HUNYUAN_T5_LEN, 4),
        num_inference_steps=steps, height=64, width=64, guidance_scale=cfg, output_type="latent",
        num_images_per_prompt=num_images_per_prompt, use_resolution_binning=False,
    )
    if cfg > 1:
        kw.update(
            negative_prompt_embeds=embeds(HUNYUAN_TEXT_LEN, 12),
            negative_prompt_attention_mask=_mask(rows, HUNYUAN_TEXT_LEN, 2),
            negative_prompt_embeds_2=embeds(HUNYUAN_T5_LEN, 16),
            negative_prompt_attention_mask_2=_mask(rows, HUNYUAN_T5_LEN, 2),
        )
    return kw | extra


# --- Sana ----------------------------------------------------------------------------------------------------------


def sana_transformer(*, num_layers: int = 2) -> SanaTransformer2DModel:
    """``num_layers`` blocks of 2 linear-attention heads of dim 8 (cross-attention: 2 heads of dim 8), 12-dim
    captions, 4 latent channels, patch size 1."""
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=8, patch_size=1,
    ).eval()


def sana_vae() -> AutoencoderDC:
    """A three-level DC-AE (4x latent scale, 4 latent channels). ``SanaPipeline`` and ``SanaPAGPipeline`` assume
    different scales without a VAE (32x and 8x), so there is one."""
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41,
    ).eval()


def sana(*, seed: int = 0) -> SanaPipeline:
    """32x32 images (Sana wants multiples of 32): 8x8 latents, 64 image tokens."""
    torch.manual_seed(seed)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=sana_vae(), transformer=sana_transformer(),
                        scheduler=FlowMatchEulerDiscreteScheduler())
    return _quiet(pipe)


def sana_inputs(*, batch: int = 2, cfg: float = 4.5, steps: int = 2, num_images_per_prompt: int = 1, seed: int = 1,
                **extra) -> dict:
    """The pipeline repeats given masks per image itself (tiled, while the embeddings are repeated per prompt), so
    the masks have one row per prompt and the same padding in every row."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(prompt_embeds=torch.randn(batch, 5, 12, generator=g), prompt_attention_mask=_mask(batch, 5, 4),
              num_inference_steps=steps, height=32, width=32, guidance_scale=cfg, output_type="latent",
              num_images_per_prompt=num_images_per_prompt, use_resolution_binning=False)
    if cfg > 1:
        kw.update(negative_prompt=None, negative_prompt_embeds=torch.randn(batch, 5, 12, generator=g),
                  negative_prompt_attention_mask=_mask(batch, 5, 3))
    return kw | extra


# --- AnimateDiff ---------------------------------------------------------------------------------------------------

ANIMATEDIFF_FRAMES = 3


def motion_adapter(**overrides) -> MotionAdapter:
    """Motion modules for :func:`support.models.unet`'s (16, 32) channels, two per down block (its
    ``layers_per_block``), 2 temporal heads, a motion module in the mid block unless overridden."""
    config = dict(block_out_channels=(16, 32), motion_layers_per_block=2, motion_num_attention_heads=2,
                  motion_norm_num_groups=4, motion_max_seq_length=8, use_motion_mid_block=True)
    return MotionAdapter(**{**config, **overrides}).eval()


def animatediff(*, seed: int = 0, motion_mid_block: bool = True) -> AnimateDiffPipeline:
    """SD1.5's layout in small (models.py): spatial layers ``down_blocks.0`` x2, ``mid_block``, ``up_blocks.1`` x3;
    the pipeline turns the UNet into a ``UNetMotionModel`` with the adapter's motion modules (its mid block a
    ``UNetMidBlockCrossAttnMotion``, or a plain ``UNetMidBlock2DCrossAttn`` without ``motion_mid_block``)."""
    torch.manual_seed(seed)
    denoiser = unet()
    adapter = motion_adapter(use_motion_mid_block=motion_mid_block)
    pipe = AnimateDiffPipeline(vae=vae(), text_encoder=None, tokenizer=None, unet=denoiser, motion_adapter=adapter,
                               scheduler=DDIMScheduler(clip_sample=False, steps_offset=1, set_alpha_to_one=False,
                                                       beta_schedule="linear"))
    pipe.unet.eval()
    return _quiet(pipe)


def animatediff_inputs(*, batch: int = 2, cfg: float = 7.5, steps: int = 2, num_frames: int = ANIMATEDIFF_FRAMES,
                       seed: int = 1, **extra) -> dict:
    """``batch`` prompts (``AnimateDiffPipeline`` makes one video per prompt: it sets ``num_videos_per_prompt = 1``
    whatever it is given), ``num_frames`` frames of 8x8 latents."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(prompt_embeds=torch.randn(batch, 7, 12, generator=g), num_frames=num_frames, num_inference_steps=steps,
              height=16, width=16, guidance_scale=cfg, output_type="latent")
    if cfg > 1:
        kw["negative_prompt_embeds"] = torch.randn(batch, 7, 12, generator=g)
    return kw | extra


def run_video(pipe, inputs: dict, seed: int = 0) -> torch.Tensor:
    """``pipe(**inputs)`` with a freshly seeded generator: the latent video ``(B, C, F, H, W)`` (``.frames``)."""
    with torch.no_grad():
        return pipe(**inputs, generator=torch.Generator().manual_seed(seed)).frames
