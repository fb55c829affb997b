"""Tiny pipelines of the Flux family beyond ``FluxPipeline`` (Flux img2img, inpaint, Fill, Kontext, ControlNet) and
of Chroma, built from configs with random seeded weights (no hub), on the VAE and scheduler of tests/support/models.py.

Every pipeline works on 16x16 images: 8x8 latents of 4 channels (the tiny VAE's scale factor is 2), packed into
4x4 = 16 image tokens of 16 channels; prompts are 6 tokens of 32 channels, passed as embeddings (text encoders
``None``). Input helpers return the keyword arguments of one call; images are seeded ``[0, 1]`` tensors.

- :func:`flux_img2img`, :func:`flux_inpaint`, :func:`flux_kontext`: ``M.flux_transformer()`` (one double block,
  two single blocks, 2 heads of 16); true CFG makes a cond and an uncond call per step, not named by
  ``cache_context`` (unlike ``FluxPipeline``).
- :func:`flux_fill`: the Fill transformer's ``hidden_states`` are the 16 latent channels plus 32 channels of
  masked-image latents and mask (48 in, 16 out); no true CFG.
- :func:`flux_kontext`: the reference image's 16 tokens follow the 16 image tokens (32 image tokens).
- :func:`flux_controlnet`: a ``FluxControlNetModel`` of one double and one single block whose output projections
  are random (diffusers zero-initialises them, which would make the residuals vanish).
- :func:`chroma`, :func:`chroma_img2img`, :func:`chroma_inpaint`: ``ChromaTransformer2DModel`` of one double and two single blocks, 2 heads
  of 16; CFG (``guidance_scale > 1``) makes a cond and an uncond call per step. Chroma pipelines always pass a text
  padding mask.

:func:`routed_calls` records the attention calls headpag routes (q, k, v and the layer's text layout).
"""

from __future__ import annotations

import contextlib

import torch
from diffusers import (
    ChromaImg2ImgPipeline,
    ChromaInpaintPipeline,
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxTransformer2DModel,
)

from . import models as M

SIZE = 16  # image height and width
TEXT_LEN = 6
TEXT_DIM = 32
POOLED_DIM = 24
NO_TEXT_MODELS = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# --- models ----------------------------------------------------------------------------------------------------


def flux_transformer(**overrides) -> FluxTransformer2DModel:
    """``M.flux_transformer()``'s config with ``overrides`` (Fill needs other input channels)."""
    config = {k: v for k, v in M.flux_transformer().config.items() if not k.startswith("_")}
    return FluxTransformer2DModel(**{**config, **overrides}).eval()


def fill_transformer() -> FluxTransformer2DModel:
    """48 input channels: 16 latent, 16 masked-image latent, 16 packed mask (the tiny VAE's 2x2 mask pixels per
    latent pixel, 2x2 packed); 16 output channels."""
    return flux_transformer(in_channels=48, out_channels=16)


def flux_controlnet_model() -> FluxControlNetModel:
    """One double and one single block (2 heads of 16) with random output projections."""
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, axes_dims_rope=(4, 6, 6),
    )
    zeroed = [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks, controlnet.controlnet_x_embedder]
    with torch.no_grad():
        for linear in zeroed:
            torch.nn.init.normal_(linear.weight, std=0.2)
            torch.nn.init.normal_(linear.bias, std=0.2)
    return controlnet.eval()


def chroma_transformer(**overrides) -> ChromaTransformer2DModel:
    """One double block and two single blocks, 2 heads of dim 16; a one-layer, 32-wide approximator."""
    config = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
                  approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1)
    return ChromaTransformer2DModel(**{**config, **overrides}).eval()


# --- Flux pipelines --------------------------------------------------------------------------------------------


def _flux_components(seed: int, transformer=None) -> dict:
    torch.manual_seed(seed)
    transformer = transformer() if transformer else M.flux_transformer()
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=M.vae(**M.SD3_VAE), transformer=transformer,
                **NO_TEXT_MODELS)


def flux_img2img(*, seed: int = 0) -> FluxImg2ImgPipeline:
    return M._quiet(FluxImg2ImgPipeline(**_flux_components(seed)))


def flux_inpaint(*, seed: int = 0) -> FluxInpaintPipeline:
    return M._quiet(FluxInpaintPipeline(**_flux_components(seed)))


def flux_fill(*, seed: int = 0) -> FluxFillPipeline:
    return M._quiet(FluxFillPipeline(**_flux_components(seed, fill_transformer)))


def flux_kontext(*, seed: int = 0) -> FluxKontextPipeline:
    return M._quiet(FluxKontextPipeline(**_flux_components(seed)))


def flux_controlnet(*, seed: int = 0) -> FluxControlNetPipeline:
    components = _flux_components(seed)
    return M._quiet(FluxControlNetPipeline(**components, controlnet=flux_controlnet_model()))


def flux_text(*, prompts: int = 2, images_per_prompt: int = 1, true_cfg_scale: float = 4.0, seed: int = 1) -> dict:
    """Prompt (and negative prompt) embeddings: ``prompts * images_per_prompt`` rows, each prompt's repeated
    consecutively (the rows ``encode_prompt`` would make; given embeddings are not repeated by the pipelines)."""
    def emb(s, *shape):
        return _randn(s, prompts, *shape).repeat_interleave(images_per_prompt, dim=0)

    return dict(prompt_embeds=emb(seed, TEXT_LEN, TEXT_DIM), pooled_prompt_embeds=emb(seed + 1, POOLED_DIM),
                negative_prompt_embeds=emb(seed + 2, TEXT_LEN, TEXT_DIM),
                negative_pooled_prompt_embeds=emb(seed + 3, POOLED_DIM), true_cfg_scale=true_cfg_scale)


def _call(steps: int, **extra) -> dict:
    return dict(num_inference_steps=steps, height=SIZE, width=SIZE, output_type="latent") | extra


def images(n: int, seed: int = 11, channels: int = 3) -> torch.Tensor:
    return _rand(seed, n, channels, SIZE, SIZE)


def masks(n: int, seed: int = 12) -> torch.Tensor:
    """Binary masks: the right half of each image (and a seeded random scatter) to repaint."""
    mask = (_rand(seed, n, 1, SIZE, SIZE) > 0.7).float()
    mask[..., SIZE // 2:] = 1.0
    return mask


def flux_img2img_inputs(*, prompts: int = 2, images_per_prompt: int = 1, true_cfg_scale: float = 4.0,
                        steps: int = 3, strength: float = 0.9, **extra) -> dict:
    rows = prompts * images_per_prompt
    return flux_text(prompts=prompts, images_per_prompt=images_per_prompt, true_cfg_scale=true_cfg_scale) | _call(
        steps, image=images(rows), strength=strength, **extra)


def flux_inpaint_inputs(*, prompts: int = 2, images_per_prompt: int = 1, true_cfg_scale: float = 4.0,
                        steps: int = 3, strength: float = 0.9, **extra) -> dict:
    rows = prompts * images_per_prompt
    return flux_text(prompts=prompts, images_per_prompt=images_per_prompt, true_cfg_scale=true_cfg_scale) | _call(
        steps, image=images(rows), mask_image=masks(rows), strength=strength, **extra)


def flux_fill_inputs(*, prompts: int = 2, images_per_prompt: int = 1, steps: int = 3, **extra) -> dict:
    rows = prompts * images_per_prompt
    text = flux_text(prompts=prompts, images_per_prompt=images_per_prompt)
    text = {k: text[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}  # Fill has no true CFG
    return text | _call(steps, image=images(rows), mask_image=masks(rows), **extra)


def flux_kontext_inputs(*, prompts: int = 2, images_per_prompt: int = 1, true_cfg_scale: float = 4.0,
                        steps: int = 3, reference: bool = True, **extra) -> dict:
    """The reference image is given as 4-channel VAE latents (Kontext then skips resizing and encoding); without
    ``reference`` the pipeline generates from text only. ``max_area`` keeps the 16x16 size."""
    rows = prompts * images_per_prompt
    kw = _call(steps, max_area=SIZE * SIZE, **extra)
    if reference:
        kw["image"] = _randn(13, rows, 4, SIZE // 2, SIZE // 2)
    return flux_text(prompts=prompts, images_per_prompt=images_per_prompt, true_cfg_scale=true_cfg_scale) | kw


def flux_controlnet_inputs(*, prompts: int = 2, images_per_prompt: int = 1, true_cfg_scale: float = 4.0,
                           steps: int = 3, **extra) -> dict:
    rows = prompts * images_per_prompt
    return flux_text(prompts=prompts, images_per_prompt=images_per_prompt, true_cfg_scale=true_cfg_scale) | _call(
        steps, control_image=images(rows, seed=14), controlnet_conditioning_scale=0.8, **extra)


# --- Chroma ----------------------------------------------------------------------------------------------------


def _chroma_components(seed: int) -> dict:
    torch.manual_seed(seed)
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=M.vae(**M.SD3_VAE), text_encoder=None,
                tokenizer=None, transformer=chroma_transformer())


def chroma(*, seed: int = 0) -> ChromaPipeline:
    return M._quiet(ChromaPipeline(**_chroma_components(seed)))


def chroma_img2img(*, seed: int = 0) -> ChromaImg2ImgPipeline:
    return M._quiet(ChromaImg2ImgPipeline(**_chroma_components(seed)))


def chroma_inpaint(*, seed: int = 0) -> ChromaInpaintPipeline:
    """diffusers 0.42.1's ChromaInpaintPipeline reads ``transformer.config.guidance_embeds``, a key Chroma's config
    does not have (AttributeError): it is added, False (Chroma has no guidance embedding)."""
    components = _chroma_components(seed)
    components["transformer"].register_to_config(guidance_embeds=False)
    return M._quiet(ChromaInpaintPipeline(**components))


def chroma_inputs(*, prompts: int = 2, images_per_prompt: int = 1, cfg: float = 4.0, steps: int = 3,
                  valid: int | tuple[int, ...] = TEXT_LEN, seed: int = 1, **extra) -> dict:
    """Prompt embeddings with their padding masks (Chroma requires them with embeddings): the first ``valid`` of
    the ``TEXT_LEN`` tokens of every prompt (or of prompt ``i``: ``valid[i]``) are valid (float 0/1, as
    ``encode_prompt`` makes them)."""
    def emb(s, *shape):
        return _randn(s, prompts, *shape).repeat_interleave(images_per_prompt, dim=0)

    lengths = (valid,) * prompts if isinstance(valid, int) else tuple(valid)
    mask = torch.zeros(prompts, TEXT_LEN)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    mask = mask.repeat_interleave(images_per_prompt, dim=0)
    kw = dict(prompt_embeds=emb(seed, TEXT_LEN, TEXT_DIM), prompt_attention_mask=mask, guidance_scale=cfg)
    if cfg > 1:
        kw.update(negative_prompt_embeds=emb(seed + 2, TEXT_LEN, TEXT_DIM), negative_prompt_attention_mask=mask.clone())
    return kw | _call(steps, **extra)


def chroma_img2img_inputs(*, prompts: int = 2, images_per_prompt: int = 1, strength: float = 0.9, **kw) -> dict:
    return chroma_inputs(prompts=prompts, images_per_prompt=images_per_prompt, **kw) | dict(
        image=images(prompts * images_per_prompt), strength=strength)


def chroma_inpaint_inputs(*, prompts: int = 2, images_per_prompt: int = 1, strength: float = 0.9, **kw) -> dict:
    rows = prompts * images_per_prompt
    return chroma_inputs(prompts=prompts, images_per_prompt=images_per_prompt, **kw) | dict(
        image=images(rows), mask_image=masks(rows), strength=strength)


@contextlib.contextmanager
def routed_calls():
    """Inside the block, every attention call that headpag routes to its kernel is recorded as a dict: ``layer``,
    ``n_text``, ``text_first`` (what the layer was told) and ``q``, ``k``, ``v`` in ``(B, N, H, D)``."""
    from headpag.guided import routing

    calls = []
    attend = routing.LayerRoute.attend

    def spy(self, q, k, v, *, layout, **kwargs):
        bnhd = (lambda t: t) if layout == "bnhd" else (lambda t: t.transpose(1, 2))
        calls.append(dict(layer=self.layer, n_text=self.c.n_text, text_first=self.c.text_first,
                          q=bnhd(q), k=bnhd(k), v=bnhd(v)))
        return attend(self, q, k, v, layout=layout, **kwargs)

    routing.LayerRoute.attend = spy
    try:
        yield calls
    finally:
        routing.LayerRoute.attend = attend


def text_values(attn: torch.nn.Module):
    """A forward hook on ``attn.add_v_proj`` and the list it fills with the text tokens' values ``(B, n_text, H, D)``:
    the first ``n_text`` tokens of the joint attention's ``v`` when the text comes first (values get no RoPE)."""
    values = []
    handle = attn.add_v_proj.register_forward_hook(lambda m, args, out: values.append(out.unflatten(-1, (attn.heads, -1))))
    return handle, values
