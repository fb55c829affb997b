"""Tiny ControlNet / edit-inpaint variants of the SD, SDXL, SD3, HunyuanDiT and Qwen-Image families (random, seeded
weights; no hub; text encoders ``None``, prompt embeddings passed directly, negatives too when CFG is on).

Built from the existing builders (:mod:`support.models`, :mod:`support.models_variants`,
:mod:`support.models_pag_families`, :mod:`support.models_qwen`). :data:`VARIANTS` maps each case to
``(factory, inputs)``; :func:`make` returns ``(pipe, inputs)``.

- ControlNets are drawn with non-zero output layers (diffusers zero-initialises them), so that their residuals
  reach the denoiser.
- ``StableDiffusion3ControlNetPipeline`` and ``HunyuanDiTControlNetPipeline`` encode the control image with
  ``vae.encode(...).latent_dist.sample()`` without a generator (the global RNG): :class:`DeterministicVAE` makes that
  sample the distribution's mean, so that two runs with the same generator are equal bit for bit.
- HunyuanDiT's pipeline builds its RoPE grid for an 8x latent scale (``height // 8``): its VAE here has 4 levels
  (8x), 64x64 images, 8x8 latents, 4x4 tokens.
- ``QwenImageEditInpaintPipeline`` resizes its image to ~1024x1024 pixels (``calculate_dimensions``);
  :func:`small_images` scales that to 32x32 inside a ``with`` block (as :func:`support.models_qwen.small_edit_images`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanDiT2DControlNetModel,
    HunyuanDiTControlNetPipeline,
    DDPMScheduler,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImageEditInpaintPipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint

from . import models as M
from . import models_pag_families as F
from . import models_qwen as Q
from . import models_variants as V


class DeterministicVAE(AutoencoderKL):
    """An ``AutoencoderKL`` whose ``encode`` returns a zero-variance latent distribution: ``sample()`` is the mean."""

    def encode(self, x, return_dict: bool = True):
        out = super().encode(x, return_dict=True)
        dist = DiagonalGaussianDistribution(out.latent_dist.parameters, deterministic=True)
        out.latent_dist = dist
        return out if return_dict else (dist,)


def _deterministic(vae: AutoencoderKL) -> DeterministicVAE:
    det = DeterministicVAE.from_config(vae.config)
    det.load_state_dict(vae.state_dict())
    return det.eval()


def _redraw(*modules: torch.nn.Module, std: float = 0.2) -> None:
    with torch.no_grad():
        for module in modules:
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.normal_(0.0, 0.05)


# --- pipelines ------------------------------------------------------------------------------------------------------


def sd_controlnet_img2img(*, seed: int = 0) -> StableDiffusionControlNetImg2ImgPipeline:
    """SD1.5's tiny layout (support.models.SD15_UNET) with a ControlNet of its down/mid layout."""
    torch.manual_seed(seed)
    unet = M.unet()
    return M._quiet(StableDiffusionControlNetImg2ImgPipeline(
        vae=M.vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=V.controlnet_for(unet),
        scheduler=V._ddim(), **V.SD_SAFETY))


def sdxl_controlnet_inpaint(*, seed: int = 0, in_channels: int = 9) -> StableDiffusionXLControlNetInpaintPipeline:
    """SDXL's tiny layout; ``in_channels`` 9 (mask and masked-image latents per row) or 4 (blend-back path)."""
    torch.manual_seed(seed)
    unet = M.unet(**{**M.SDXL_UNET, "in_channels": in_channels, "out_channels": 4})
    return M._quiet(StableDiffusionXLControlNetInpaintPipeline(
        vae=M.vae(), unet=unet, controlnet=V.controlnet_for(unet), scheduler=EulerDiscreteScheduler(),
        **V.NO_SDXL_TEXT))


def sd3_controlnet(*, seed: int = 0, num_layers: int = 2) -> StableDiffusion3ControlNetPipeline:
    """support.models.sd3_transformer (3 joint blocks) and an SD3ControlNetModel of ``num_layers`` blocks of the same
    width: 2 residuals for 3 blocks (``interval_control`` 1.5: blocks 0, 1 get residual 0, block 2 residual 1)."""
    torch.manual_seed(seed)
    transformer = M.sd3_transformer()
    config = transformer.config
    controlnet = SD3ControlNetModel(
        sample_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels,
        num_layers=num_layers, attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads, joint_attention_dim=config.joint_attention_dim,
        caption_projection_dim=config.caption_projection_dim, pooled_projection_dim=config.pooled_projection_dim,
        out_channels=config.out_channels, pos_embed_max_size=config.pos_embed_max_size,
    ).eval()
    _redraw(*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj)
    return M._quiet(StableDiffusion3ControlNetPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_deterministic(M.vae(**M.SD3_VAE)), controlnet=controlnet, **V.NO_SD3_TEXT))


def hunyuandit_controlnet(*, seed: int = 0, style_cond: bool = True) -> HunyuanDiTControlNetPipeline:
    """support.models_pag_families.hunyuandit's 6-block transformer, a ControlNet of its first 2 blocks (residuals
    into the long skips of blocks 4 and 5) and a 4-level (8x) VAE."""
    torch.manual_seed(seed)
    transformer = F.hunyuandit_transformer(style_cond=style_cond)
    controlnet = HunyuanDiT2DControlNetModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
        transformer_num_layers=6, cross_attention_dim=12, cross_attention_dim_t5=16, pooled_projection_dim=8,
        text_len=F.HUNYUAN_TEXT_LEN, text_len_t5=F.HUNYUAN_T5_LEN, use_style_cond_and_image_meta_size=style_cond,
    ).eval()
    _redraw(controlnet.input_block, *controlnet.controlnet_blocks)
    vae = M.vae(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = HunyuanDiTControlNetPipeline(
        vae=_deterministic(vae), text_encoder=None, tokenizer=None, transformer=transformer,
        scheduler=DDPMScheduler(clip_sample=False, prediction_type="v_prediction", steps_offset=1),
        safety_checker=None, feature_extractor=None, controlnet=controlnet, text_encoder_2=None, tokenizer_2=None,
        requires_safety_checker=False)
    return M._quiet(pipe)


def qwen_edit_inpaint(*, seed: int = 0) -> QwenImageEditInpaintPipeline:
    torch.manual_seed(seed)
    pipe = QwenImageEditInpaintPipeline(transformer=Q.transformer(), vae=Q.vae(),
                                        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None,
                                        processor=None)
    return M._quiet(pipe)


def qwen_controlnet(*, seed: int = 0, num_layers: int = 2) -> QwenImageControlNetPipeline:
    """support.models_qwen's 3-block transformer and a ControlNet of ``num_layers`` blocks (``interval_control``
    2: blocks 0, 1 get residual 0, block 2 residual 1)."""
    torch.manual_seed(seed)
    transformer = Q.transformer()
    config = transformer.config
    controlnet = QwenImageControlNetModel(
        patch_size=config.patch_size, in_channels=config.in_channels, out_channels=config.out_channels,
        num_layers=num_layers, attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads, joint_attention_dim=config.joint_attention_dim,
        axes_dims_rope=tuple(config.axes_dims_rope),
    ).eval()
    _redraw(*controlnet.controlnet_blocks, controlnet.controlnet_x_embedder)
    pipe = QwenImageControlNetPipeline(transformer=transformer, vae=Q.vae(), scheduler=FlowMatchEulerDiscreteScheduler(),
                                       text_encoder=None, tokenizer=None, controlnet=controlnet)
    return M._quiet(pipe)


# --- inputs ---------------------------------------------------------------------------------------------------------


def _pil(seed: int, size: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def sd_controlnet_img2img_inputs(*, batch: int = 2, num_images_per_prompt: int = 2, cfg: float = 5.0, steps: int = 4,
                                 strength: float = 0.75, seed: int = 1, **extra) -> dict:
    """``batch`` prompts x ``num_images_per_prompt``: one init image per output image, one control image per prompt."""
    kw = V._embeddings(width=V.TEXT_WIDTH, pooled=None, rows=batch, cfg=cfg, seed=seed)
    kw.update(num_images_per_prompt=num_images_per_prompt, num_inference_steps=steps, guidance_scale=cfg,
              output_type="latent", height=V.SIZE, width=V.SIZE, image=V.images(batch * num_images_per_prompt),
              strength=strength, control_image=V.images(batch, seed=12))
    return kw | extra


def sdxl_controlnet_inpaint_inputs(*, batch: int = 2, num_images_per_prompt: int = 2, cfg: float = 5.0, steps: int = 4,
                                   strength: float = 0.75, seed: int = 1, **extra) -> dict:
    n_out = batch * num_images_per_prompt
    kw = V._embeddings(width=V.TEXT_WIDTH, pooled=V.POOLED, rows=batch, cfg=cfg, seed=seed)
    kw.update(num_images_per_prompt=num_images_per_prompt, num_inference_steps=steps, guidance_scale=cfg,
              output_type="latent", height=V.SIZE, width=V.SIZE, image=V.images(n_out), mask_image=V.masks(n_out),
              strength=strength, control_image=V.images(batch, seed=12))
    return kw | extra


def sd3_controlnet_inputs(*, batch: int = 2, num_images_per_prompt: int = 2, cfg: float = 5.0, steps: int = 2,
                          seed: int = 1, **extra) -> dict:
    """SD3's embeddings already repeated per image (:func:`support.models.sd3_inputs`); one control image per
    output image (the pipeline repeats a batch of them by ``num_images_per_prompt`` only when it is one image)."""
    kw = M.sd3_inputs(batch=batch, cfg=cfg, steps=steps, num_images_per_prompt=num_images_per_prompt, seed=seed)
    kw["control_image"] = V.images(1, seed=12)
    return kw | extra


def hunyuandit_controlnet_inputs(*, batch: int = 2, num_images_per_prompt: int = 2, cfg: float = 5.0, steps: int = 2,
                                 seed: int = 1, **extra) -> dict:
    kw = F.hunyuandit_inputs(batch=batch, num_images_per_prompt=num_images_per_prompt, cfg=cfg, steps=steps, seed=seed)
    kw["control_image"] = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    return kw | extra


def qwen_edit_inpaint_inputs(*, prompts: int = 2, images_per_prompt: int = 2, true_cfg_scale: float = 4.0,
                             steps: int = 2, **extra) -> dict:
    """support.models_qwen.inputs' inpaint call (image, mask, strength): here the image is also the reference."""
    kw = Q.inputs("inpaint", prompts=prompts, images_per_prompt=images_per_prompt, true_cfg_scale=true_cfg_scale,
                  steps=steps)
    del kw["height"], kw["width"]  # the pipeline takes them from the (resized) image
    return kw | extra


def qwen_controlnet_inputs(*, prompts: int = 2, images_per_prompt: int = 2, true_cfg_scale: float = 4.0,
                           steps: int = 2, **extra) -> dict:
    kw = Q.inputs("t2i", prompts=prompts, images_per_prompt=images_per_prompt, true_cfg_scale=true_cfg_scale,
                  steps=steps)
    kw["control_image"] = _pil(4, Q.SIZE)
    return kw | extra


@contextlib.contextmanager
def small_images():
    """``QwenImageEditInpaintPipeline`` resizes its image to 32x32 instead of ~1024x1024."""
    area = Q.SIZE * Q.SIZE
    with pytest.MonkeyPatch.context() as mp:
        original = pipeline_qwenimage_edit_inpaint.calculate_dimensions
        mp.setattr(pipeline_qwenimage_edit_inpaint, "calculate_dimensions",
                   lambda target, ratio, f=original: f(area, ratio))
        yield


VARIANTS = {
    "sd_controlnet_img2img": (sd_controlnet_img2img, sd_controlnet_img2img_inputs),
    "sdxl_controlnet_inpaint": (sdxl_controlnet_inpaint, sdxl_controlnet_inpaint_inputs),
    "sd3_controlnet": (sd3_controlnet, sd3_controlnet_inputs),
    "hunyuandit_controlnet": (hunyuandit_controlnet, hunyuandit_controlnet_inputs),
    "qwen_edit_inpaint": (qwen_edit_inpaint, qwen_edit_inpaint_inputs),
    "qwen_controlnet": (qwen_controlnet, qwen_controlnet_inputs),
}


def make(name: str, build: dict | None = None, **kw) -> tuple:
    factory, make_inputs = VARIANTS[name]
    return factory(**(build or {})), make_inputs(**kw)
