"""Tiny pipelines of the remaining Flux-family pipelines, built from configs with random seeded weights (no hub, no
text encoder), reusing the builders of :mod:`support.models_flux_family` (FLUX.1) and :mod:`support.models_flux2`
(FLUX.2-klein).

FLUX.1 pipelines work on 16x16 images (8x8 latents of 4 channels, packed into 4x4 = 16 image tokens of 16
channels), 6 prompt tokens passed as embeddings:

- :func:`flux_control`, :func:`flux_control_img2img`, :func:`flux_control_inpaint` (FLUX.1 Canny/Depth): the
  control image's packed latents are concatenated to the latents as extra channels, so the transformer takes 32
  input channels (16 latent + 16 control) and gives 16; one call per step, no true CFG.
- :func:`flux_controlnet_img2img`, :func:`flux_controlnet_inpaint`: ``M.flux_transformer()`` and the ControlNet
  model of :func:`support.models_flux_family.flux_controlnet_model` (random output projections); one transformer
  call per step, no true CFG.
- :func:`flux_kontext_inpaint`: ``M.flux_transformer()``; the image to repaint (or a reference image) is encoded and
  its 16 tokens follow the 16 image tokens; true CFG makes a second, unnamed call per step on the same
  ``latent_model_input``.

:func:`klein_inpaint` (``Flux2KleinInpaintPipeline``): the tiny FLUX.2 transformer without guidance embedding and
the tiny ``AutoencoderKLFlux2`` of :mod:`support.models_flux2`; 8x8 images (4 image tokens, 4 condition-image tokens
after them), 5 prompt tokens; true CFG (``guidance_scale > 1``) in a second call under ``cache_context("uncond")``.

Input helpers return the keyword arguments of one call (``output_type="latent"``). As for the other FLUX.1 pipelines,
given prompt embeddings are not repeated per image by the pipelines: ``prompts * images_per_prompt`` rows are passed,
each prompt's repeated consecutively (:func:`support.models_flux_family.flux_text`).
"""

from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinInpaintPipeline,
    FluxControlImg2ImgPipeline,
    FluxControlInpaintPipeline,
    FluxControlNetImg2ImgPipeline,
    FluxControlNetInpaintPipeline,
    FluxControlPipeline,
    FluxKontextInpaintPipeline,
)

from . import models as M
from . import models_flux2 as F2
from . import models_flux_family as F

SIZE = F.SIZE
KLEIN_SIZE = 8


# --- FLUX.1 ----------------------------------------------------------------------------------------------------


def control_transformer():
    """32 input channels: 16 packed latent channels, then 16 packed control-image channels; 16 output channels."""
    return F.flux_transformer(in_channels=32, out_channels=16)


def _quiet_flux(cls, seed: int, transformer=None, **extra):
    return M._quiet(cls(**F._flux_components(seed, transformer), **extra))


def flux_control(*, seed: int = 0) -> FluxControlPipeline:
    return _quiet_flux(FluxControlPipeline, seed, control_transformer)


def flux_control_img2img(*, seed: int = 0) -> FluxControlImg2ImgPipeline:
    return _quiet_flux(FluxControlImg2ImgPipeline, seed, control_transformer)


def flux_control_inpaint(*, seed: int = 0) -> FluxControlInpaintPipeline:
    return _quiet_flux(FluxControlInpaintPipeline, seed, control_transformer)


def flux_controlnet_img2img(*, seed: int = 0) -> FluxControlNetImg2ImgPipeline:
    components = F._flux_components(seed)
    return M._quiet(FluxControlNetImg2ImgPipeline(**components, controlnet=F.flux_controlnet_model()))


def flux_controlnet_inpaint(*, seed: int = 0) -> FluxControlNetInpaintPipeline:
    components = F._flux_components(seed)
    return M._quiet(FluxControlNetInpaintPipeline(**components, controlnet=F.flux_controlnet_model()))


def flux_kontext_inpaint(*, seed: int = 0) -> FluxKontextInpaintPipeline:
    return _quiet_flux(FluxKontextInpaintPipeline, seed)


def _text(prompts: int, images_per_prompt: int, true_cfg_scale: float | None) -> dict:
    """Prompt embeddings; with ``true_cfg_scale`` (pipelines with true CFG) also the negative ones and the scale."""
    text = F.flux_text(prompts=prompts, images_per_prompt=images_per_prompt,
                       true_cfg_scale=1.0 if true_cfg_scale is None else true_cfg_scale)
    if true_cfg_scale is None:
        text = {k: text[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    return text


def flux_control_inputs(*, prompts: int = 2, images_per_prompt: int = 1, steps: int = 3, **extra) -> dict:
    rows = prompts * images_per_prompt
    return _text(prompts, images_per_prompt, None) | F._call(steps, control_image=F.images(rows, seed=14), **extra)


def flux_control_img2img_inputs(*, prompts: int = 2, images_per_prompt: int = 1, steps: int = 3,
                                strength: float = 0.9, **extra) -> dict:
    rows = prompts * images_per_prompt
    return flux_control_inputs(prompts=prompts, images_per_prompt=images_per_prompt, steps=steps,
                               image=F.images(rows), strength=strength, **extra)


def flux_control_inpaint_inputs(*, prompts: int = 2, images_per_prompt: int = 1, steps: int = 3,
                                strength: float = 0.9, **extra) -> dict:
    rows = prompts * images_per_prompt
    return flux_control_inputs(prompts=prompts, images_per_prompt=images_per_prompt, steps=steps,
                               image=F.images(rows), mask_image=F.masks(rows), strength=strength, **extra)


def flux_controlnet_img2img_inputs(*, prompts: int = 2, images_per_prompt: int = 1, steps: int = 3,
                                   strength: float = 0.9, **extra) -> dict:
    rows = prompts * images_per_prompt
    return _text(prompts, images_per_prompt, None) | F._call(
        steps, image=F.images(rows), control_image=F.images(rows, seed=14), controlnet_conditioning_scale=0.8,
        strength=strength, **extra)


def flux_controlnet_inpaint_inputs(*, prompts: int = 2, images_per_prompt: int = 1, steps: int = 3,
                                   strength: float = 0.9, **extra) -> dict:
    rows = prompts * images_per_prompt
    return flux_controlnet_img2img_inputs(prompts=prompts, images_per_prompt=images_per_prompt, steps=steps,
                                          strength=strength, mask_image=F.masks(rows), **extra)


def flux_kontext_inpaint_inputs(*, prompts: int = 2, images_per_prompt: int = 1, true_cfg_scale: float = 4.0,
                                steps: int = 3, strength: float = 0.9, reference: bool = False, **extra) -> dict:
    """RGB image and mask (Kontext inpaint encodes the image itself: its tokens follow the image tokens); with
    ``reference`` an RGB reference image whose tokens are used instead. ``max_area`` and ``_auto_resize=False``
    keep the 16x16 size."""
    rows = prompts * images_per_prompt
    kw = dict(image=F.images(rows), mask_image=F.masks(rows), strength=strength, max_area=SIZE * SIZE,
              _auto_resize=False)
    if reference:
        kw["image_reference"] = F.images(rows, seed=15)
    return _text(prompts, images_per_prompt, true_cfg_scale) | F._call(steps, **kw, **extra)


# --- FLUX.2-klein ------------------------------------------------------------------------------------------------


def klein_inpaint(*, seed: int = 0) -> Flux2KleinInpaintPipeline:
    torch.manual_seed(seed)
    transformer = F2.flux2_transformer(guidance_embeds=False)
    return F2._quiet(Flux2KleinInpaintPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=F2.flux2_vae(),
                                               text_encoder=None, tokenizer=None, transformer=transformer))


def klein_inpaint_inputs(*, batch: int = 1, num_images_per_prompt: int = 1, cfg: float = 4.0, steps: int = 3,
                         strength: float = 0.9, **extra) -> dict:
    """``batch`` prompts x ``num_images_per_prompt`` images: the RGB images and masks are given per generated image
    (``batch * num_images_per_prompt`` of them)."""
    rows = batch * num_images_per_prompt
    images = torch.rand(rows, 3, KLEIN_SIZE, KLEIN_SIZE, generator=torch.Generator().manual_seed(11))
    masks = (torch.rand(rows, 1, KLEIN_SIZE, KLEIN_SIZE, generator=torch.Generator().manual_seed(12)) > 0.7).float()
    masks[..., KLEIN_SIZE // 2:] = 1.0
    return F2.klein_inputs(batch=batch, num_images_per_prompt=num_images_per_prompt, cfg=cfg, steps=steps,
                           image=images, mask_image=masks, strength=strength, **extra)
