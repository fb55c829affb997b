"""Tiny Qwen-Image pipelines built from configs (random seeded weights, no hub), and the inputs of one call.

The text encoder, tokenizer and (edit) vision-language processor are ``None``: prompt embeddings and their masks
are passed directly (negatives too when true CFG is on), so the edit pipelines' prompt encoding never looks at the
image. The denoiser works on 32x32 images: the VAE compresses 4x (``temperal_downsample`` of length 2), the
transformer packs 2x2 patches, so 4x4 = 16 image tokens of 16 channels; 5 text tokens.

The edit pipelines resize their input image to about 1024 x 1024 pixels before the VAE (``calculate_dimensions``
with a fixed target area); :func:`small_edit_images` scales that area down to 32 x 32 inside a ``with`` block.
"""

from __future__ import annotations

import contextlib

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

HEADS = 4
HEAD_DIM = 16
LAYERS = 3
TEXT_DIM = 16
TEXT_LEN = 5
SIZE = 32  # pixels: 8x8 latents, 4x4 packed tokens


def transformer(**overrides) -> QwenImageTransformer2DModel:
    """:data:`LAYERS` double-stream blocks of :data:`HEADS` heads of :data:`HEAD_DIM`; 16-dim text; 4 latent
    channels (16 packed)."""
    config = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=LAYERS, attention_head_dim=HEAD_DIM,
                  num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, guidance_embeds=False,
                  axes_dims_rope=(8, 4, 4))
    return QwenImageTransformer2DModel(**{**config, **overrides}).eval()


def vae() -> AutoencoderKLQwenImage:
    """4 latent channels, 4x spatial compression (``vae_scale_factor`` 4), identity latent normalisation."""
    z_dim = 4
    return AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.0] * z_dim,
                                  latents_std=[1.0] * z_dim).eval()


PIPELINES = {
    "t2i": QwenImagePipeline,
    "img2img": QwenImageImg2ImgPipeline,
    "inpaint": QwenImageInpaintPipeline,
    "edit": QwenImageEditPipeline,
    "edit_plus": QwenImageEditPlusPipeline,
}


def pipeline(kind: str = "t2i", *, seed: int = 0, **transformer_overrides):
    """A fresh pipeline of :data:`PIPELINES` ``[kind]`` (progress bar off)."""
    torch.manual_seed(seed)
    components = dict(transformer=transformer(**transformer_overrides), vae=vae(),
                      scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None, tokenizer=None)
    if kind.startswith("edit"):
        components["processor"] = None
    pipe = PIPELINES[kind](**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def inputs(kind: str = "t2i", *, prompts: int = 1, images_per_prompt: int = 1, true_cfg_scale: float = 4.0,
           steps: int = 2, mask: torch.Tensor | None = None, negative_mask: torch.Tensor | None = None) -> dict:
    """Keyword arguments of one call of ``steps`` denoising steps: ``prompts`` seeded prompt embeddings (all-ones masks unless ``mask`` /
    ``negative_mask`` are given), negative ones when ``true_cfg_scale > 1`` (true CFG on), latent output."""
    g = torch.Generator().manual_seed(1)
    ones = torch.ones(prompts, TEXT_LEN, dtype=torch.long)
    call = dict(prompt_embeds=torch.randn(prompts, TEXT_LEN, TEXT_DIM, generator=g),
                prompt_embeds_mask=ones if mask is None else mask,
                true_cfg_scale=true_cfg_scale, num_inference_steps=steps, height=SIZE, width=SIZE,
                num_images_per_prompt=images_per_prompt, output_type="latent")
    if true_cfg_scale > 1:
        call.update(negative_prompt_embeds=torch.randn(prompts, TEXT_LEN, TEXT_DIM, generator=g),
                    negative_prompt_embeds_mask=ones if negative_mask is None else negative_mask)
    if kind in ("img2img", "inpaint"):
        # a schedule of steps + 1 of which the last ``steps`` run: the first (sigma 1) would make the image pure noise
        call.update(image=_image(2), num_inference_steps=steps + 1, strength=(steps - 0.5) / (steps + 1))
    if kind == "inpaint":
        box = np.zeros((SIZE, SIZE), dtype=np.uint8)
        box[8:24, 8:24] = 255
        call.update(mask_image=PIL.Image.fromarray(box))
    if kind.startswith("edit"):
        call.update(image=_image(3))
    return call


@contextlib.contextmanager
def small_edit_images():
    """The edit pipelines resize their input image to :data:`SIZE` x :data:`SIZE` instead of ~1024 x 1024."""
    area = SIZE * SIZE
    with pytest.MonkeyPatch.context() as mp:
        for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus):
            original = module.calculate_dimensions
            mp.setattr(module, "calculate_dimensions", lambda target, ratio, f=original: f(area, ratio))
        yield


def run(pipe, call: dict, seed: int = 0) -> torch.Tensor:
    """``pipe(**call)`` with a freshly seeded generator: the packed latents."""
    with torch.no_grad():
        return pipe(**call, generator=torch.Generator().manual_seed(seed)).images
