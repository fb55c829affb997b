"""Tiny image-conditioned variants of the SD / SDXL / SD3 families and Kolors (random, seeded weights; no hub).

Built from the denoisers and VAE of :mod:`support.models` (``M.unet``, ``M.SDXL_UNET``, ``M.sd3_transformer``,
``M.vae``). Every pipeline works on 16x16 images (the tiny VAE halves them: 8x8 latents); text encoders are
``None`` and calls pass prompt embeddings (negatives too when CFG is on), except Kolors img2img (below).
:data:`VARIANTS` names each pipeline's factory, how its inputs are made, and diffusers' PAG peer where there is one.

- Inpainting UNets have ``in_channels=9`` (latents, mask, masked-image latents concatenated per row by the
  pipeline); ``in_channels=4`` keeps the pipeline's other path (the known region blended back after each step).
- SD3 inpainting: ``in_channels=33`` (16 latent channels + mask + masked-image latents) or ``16`` (blend path),
  with a 16-channel VAE (the pipeline only uses the mask for transformers of 16 or 33 input channels).
- ControlNets are built from their UNet's config (4 input channels: they see the latents before the mask is
  concatenated) and their zero-initialised output convolutions are re-drawn, so that the residuals they add to the
  UNet are not zero.
- Kolors: an SDXL-layout UNet whose text goes through ``encoder_hid_proj`` (``encoder_hid_dim_type="text_proj"``;
  ChatGLM's width, 4096 in the real model and 16 here, for the tokens and the pooled vector alike).
  ``KolorsPipeline`` gets embeddings; its ``encode_prompt`` repeats given *pooled* embeddings for
  ``num_images_per_prompt`` but not the given token embeddings, so (like SD3's) its inputs hold
  ``batch * num_images_per_prompt`` rows, each prompt's repeated. ``KolorsImg2ImgPipeline.__call__`` does not pass
  ``pooled_prompt_embeds`` on to ``encode_prompt`` (diffusers 0.42.1), so it cannot run on embeddings alone: it gets
  prompts, a tiny random ChatGLM (:func:`chatglm`) and :class:`TinyGLMTokenizer` in place of ``ChatGLMTokenizer``
  (which needs ``sentencepiece`` and a vocabulary file). The Kolors classes are imported from their submodules:
  without ``sentencepiece`` the top-level ``diffusers.KolorsPipeline`` is a dummy.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3PAGImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPAGInpaintPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPAGImg2ImgPipeline,
    StableDiffusionPAGInpaintPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPAGImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPAGImg2ImgPipeline,
    StableDiffusionXLPAGInpaintPipeline,
)
from diffusers.pipelines.kolors.pipeline_kolors import KolorsPipeline
from diffusers.pipelines.kolors.pipeline_kolors_img2img import KolorsImg2ImgPipeline
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel
from diffusers.pipelines.pag.pipeline_pag_kolors import KolorsPAGPipeline
from transformers import BatchEncoding

from . import models as M

SIZE = 16  # image height and width (8x8 latents)
TEXT_WIDTH = 12  # SD / SDXL prompt-embedding width (the UNets' cross_attention_dim)
POOLED = 10  # SDXL pooled width (SDXL_UNET's projection input is 10 + 6 time ids * 4)
KOLORS_TEXT = 16  # Kolors' (ChatGLM's) width: prompt embeddings before encoder_hid_proj and pooled embeddings
SD_SAFETY = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
NO_SDXL_TEXT = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
NO_SD3_TEXT = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                   tokenizer_3=None)
KOLORS_UNET = dict(M.SDXL_UNET, encoder_hid_dim_type="text_proj", encoder_hid_dim=KOLORS_TEXT,
                   projection_class_embeddings_input_dim=KOLORS_TEXT + 6 * 4)


def _ddim():
    return DDIMScheduler(clip_sample=False, steps_offset=1, set_alpha_to_one=False)


def _seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def controlnet_for(unet) -> ControlNetModel:
    """A ControlNet with ``unet``'s down/mid layout on 4-channel latents, with non-zero output convolutions."""
    names = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in unet.config.items() if k in names}
    controlnet = ControlNetModel(**{**config, "in_channels": 4, "conditioning_embedding_out_channels": (8, 8)})
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.2)
            conv.bias.normal_(0.0, 0.05)
    return controlnet.eval()


def sd3_transformer(in_channels: int = 4, out_channels: int = 4) -> SD3Transformer2DModel:
    """:func:`support.models.sd3_transformer`'s config with other channel counts."""
    config = dict(M.sd3_transformer().config)
    return SD3Transformer2DModel.from_config({**config, "in_channels": in_channels,
                                              "out_channels": out_channels}).eval()


class TinyGLMTokenizer:
    """Stands in for ``ChatGLMTokenizer``: one id per character (``ord % 63 + 1``) after a start token (1), padded
    with 0 on the left as ChatGLM's tokenizer pads (Kolors pools the hidden state of the last position, which is
    then always a real token), always ``length`` tokens whatever ``max_length`` the pipeline asks for (256)."""

    def __init__(self, length: int = 8):
        self.length = length

    def __call__(self, text, **_):
        texts = [text] if isinstance(text, str) else list(text)
        ids = torch.zeros(len(texts), self.length, dtype=torch.long)
        for row, t in enumerate(texts):
            tokens = [1] + [ord(c) % 63 + 1 for c in t][: self.length - 1]
            ids[row, self.length - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask = (ids != 0).long()
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        return BatchEncoding({"input_ids": ids, "attention_mask": mask, "position_ids": positions})


def chatglm() -> ChatGLMModel:
    """One GLM block of 4 query heads (2 key/value groups) of dim 4: 16-dim hidden states. ChatGLM leaves weights
    uninitialised for checkpoints to fill (``skip_init`` on its linear layers unless ``empty_init=False``, its RMS
    norms' weights ``torch.empty`` always): the norms are set to 1 here."""
    config = ChatGLMConfig(num_layers=1, padded_vocab_size=64, hidden_size=KOLORS_TEXT, ffn_hidden_size=32,
                           kv_channels=4, num_attention_heads=4, seq_length=16, multi_query_attention=True,
                           multi_query_group_num=2, original_rope=True)
    model = ChatGLMModel(config, empty_init=False).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
    return model


# --- pipelines ------------------------------------------------------------------------------------------------


def sd_img2img(*, seed: int = 0) -> StableDiffusionImg2ImgPipeline:
    torch.manual_seed(seed)
    return M._quiet(StableDiffusionImg2ImgPipeline(vae=M.vae(), text_encoder=None, tokenizer=None, unet=M.unet(),
                                                   scheduler=_ddim(), **SD_SAFETY))


def sd_inpaint(*, seed: int = 0, in_channels: int = 9) -> StableDiffusionInpaintPipeline:
    torch.manual_seed(seed)
    unet = M.unet(in_channels=in_channels, out_channels=4)
    return M._quiet(StableDiffusionInpaintPipeline(vae=M.vae(), text_encoder=None, tokenizer=None, unet=unet,
                                                   scheduler=_ddim(), **SD_SAFETY))


def sdxl_img2img(*, seed: int = 0) -> StableDiffusionXLImg2ImgPipeline:
    torch.manual_seed(seed)
    return M._quiet(StableDiffusionXLImg2ImgPipeline(vae=M.vae(), unet=M.unet(**M.SDXL_UNET),
                                                     scheduler=EulerDiscreteScheduler(), **NO_SDXL_TEXT))


def sdxl_inpaint(*, seed: int = 0, in_channels: int = 9) -> StableDiffusionXLInpaintPipeline:
    torch.manual_seed(seed)
    unet = M.unet(**{**M.SDXL_UNET, "in_channels": in_channels, "out_channels": 4})
    return M._quiet(StableDiffusionXLInpaintPipeline(vae=M.vae(), unet=unet, scheduler=EulerDiscreteScheduler(),
                                                     **NO_SDXL_TEXT))


def sd_controlnet_inpaint(*, seed: int = 0) -> StableDiffusionControlNetInpaintPipeline:
    torch.manual_seed(seed)
    unet = M.unet(in_channels=9, out_channels=4)
    return M._quiet(StableDiffusionControlNetInpaintPipeline(
        vae=M.vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet_for(unet),
        scheduler=_ddim(), **SD_SAFETY))


def sdxl_controlnet_img2img(*, seed: int = 0) -> StableDiffusionXLControlNetImg2ImgPipeline:
    torch.manual_seed(seed)
    unet = M.unet(**M.SDXL_UNET)
    return M._quiet(StableDiffusionXLControlNetImg2ImgPipeline(
        vae=M.vae(), unet=unet, controlnet=controlnet_for(unet), scheduler=EulerDiscreteScheduler(), **NO_SDXL_TEXT))


def sd3_img2img(*, seed: int = 0) -> StableDiffusion3Img2ImgPipeline:
    torch.manual_seed(seed)
    return M._quiet(StableDiffusion3Img2ImgPipeline(transformer=M.sd3_transformer(),
                                                    scheduler=FlowMatchEulerDiscreteScheduler(),
                                                    vae=M.vae(**M.SD3_VAE), **NO_SD3_TEXT))


def sd3_inpaint(*, seed: int = 0, in_channels: int = 33) -> StableDiffusion3InpaintPipeline:
    """16 latent channels; ``in_channels`` 33 (mask and masked-image latents concatenated) or 16 (blend path)."""
    torch.manual_seed(seed)
    return M._quiet(StableDiffusion3InpaintPipeline(transformer=sd3_transformer(in_channels, 16),
                                                    scheduler=FlowMatchEulerDiscreteScheduler(),
                                                    vae=M.vae(latent_channels=16, **M.SD3_VAE), **NO_SD3_TEXT))


def kolors(*, seed: int = 0) -> KolorsPipeline:
    torch.manual_seed(seed)
    return M._quiet(KolorsPipeline(vae=M.vae(), text_encoder=None, tokenizer=None, unet=M.unet(**KOLORS_UNET),
                                   scheduler=EulerDiscreteScheduler()))


def kolors_img2img(*, seed: int = 0) -> KolorsImg2ImgPipeline:
    torch.manual_seed(seed)
    return M._quiet(KolorsImg2ImgPipeline(vae=M.vae(), text_encoder=chatglm(), tokenizer=TinyGLMTokenizer(),
                                          unet=M.unet(**KOLORS_UNET), scheduler=EulerDiscreteScheduler()))


# --- inputs ---------------------------------------------------------------------------------------------------


def images(n: int, seed: int = 11) -> torch.Tensor:
    """``n`` RGB images in [0, 1]."""
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def masks(n: int) -> torch.Tensor:
    """``n`` one-channel masks (1 = repaint): a rectangle, shifted per image."""
    mask = torch.zeros(n, 1, SIZE, SIZE)
    for i in range(n):
        mask[i, :, 2 + i:10 + i, 4:12] = 1.0
    return mask


def _embeddings(*, width: int, pooled: int | None, rows: int, cfg: float, seed: int) -> dict:
    kw = dict(prompt_embeds=_seeded(seed, rows, M.TEXT_LEN, width))
    if pooled:
        kw["pooled_prompt_embeds"] = _seeded(seed + 1, rows, pooled)
    if cfg > 1:
        kw["negative_prompt_embeds"] = _seeded(seed + 2, rows, M.TEXT_LEN, width)
        if pooled:
            kw["negative_pooled_prompt_embeds"] = _seeded(seed + 3, rows, pooled)
    return kw


@dataclass(frozen=True)
class Variant:
    """One pipeline of the tests.

    Attributes:
        build: the factory (keyword overrides such as ``in_channels`` go through).
        text: ``"sd"`` (12-dim embeddings), ``"sdxl"`` (12-dim + 10-dim pooled), ``"sd3"`` (:func:`M.sd3_inputs`),
            ``"kolors"`` (16-dim + 16-dim pooled) or ``"prompts"`` (strings for the pipeline's own text encoder).
        image, mask, control: whether the call takes ``image``, ``mask_image``, ``control_image``.
        peer: diffusers' PAG pipeline of the variant (None when diffusers has none).
        repeat_embeds: the pipeline does not repeat given embeddings per image: pass them already repeated.
        peer_kwargs: extra constructor arguments of the peer.
    """

    build: Callable
    text: str
    image: bool = True
    mask: bool = False
    control: bool = False
    peer: type | None = None
    repeat_embeds: bool = False
    peer_kwargs: dict = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "sd_img2img": Variant(sd_img2img, "sd", peer=StableDiffusionPAGImg2ImgPipeline,
                          peer_kwargs=dict(requires_safety_checker=False)),
    "sd_inpaint": Variant(sd_inpaint, "sd", mask=True, peer=StableDiffusionPAGInpaintPipeline,
                          peer_kwargs=dict(requires_safety_checker=False)),
    "sdxl_img2img": Variant(sdxl_img2img, "sdxl", peer=StableDiffusionXLPAGImg2ImgPipeline),
    "sdxl_inpaint": Variant(sdxl_inpaint, "sdxl", mask=True, peer=StableDiffusionXLPAGInpaintPipeline),
    "sd_controlnet_inpaint": Variant(sd_controlnet_inpaint, "sd", mask=True, control=True,
                                     peer=StableDiffusionControlNetPAGInpaintPipeline,
                                     peer_kwargs=dict(requires_safety_checker=False)),
    "sdxl_controlnet_img2img": Variant(sdxl_controlnet_img2img, "sdxl", control=True,
                                       peer=StableDiffusionXLControlNetPAGImg2ImgPipeline),
    "sd3_img2img": Variant(sd3_img2img, "sd3", peer=StableDiffusion3PAGImg2ImgPipeline, repeat_embeds=True),
    "sd3_inpaint": Variant(sd3_inpaint, "sd3", mask=True, repeat_embeds=True),
    "kolors": Variant(kolors, "kolors", image=False, peer=KolorsPAGPipeline, repeat_embeds=True),
    "kolors_img2img": Variant(kolors_img2img, "prompts"),
}


def inputs(name: str, pipe, *, batch: int = 2, num_images_per_prompt: int = 2, cfg: float = 5.0, steps: int = 4,
           strength: float = 0.75, seed: int = 1, **extra) -> dict:
    """The keyword arguments of one call of ``VARIANTS[name]``'s pipeline ``pipe``: ``batch`` prompts with
    ``num_images_per_prompt`` images each (one input image and mask per output image; one control image per
    prompt), ``steps`` scheduler steps of which the last ``strength`` run (3 of 4 by default; text-to-image: all),
    latent output; ``extra`` added as is."""
    variant = VARIANTS[name]
    n_out = batch * num_images_per_prompt
    if variant.text == "sd3":
        kw = M.sd3_inputs(batch=batch, cfg=cfg, steps=steps, num_images_per_prompt=num_images_per_prompt, seed=seed)
    else:
        if variant.text == "prompts":
            kw = dict(prompt=["a red fox", "two blue cars", "a tree", "an old boat"][:batch])
        else:
            width, pooled = {"sd": (TEXT_WIDTH, None), "sdxl": (TEXT_WIDTH, POOLED),
                             "kolors": (KOLORS_TEXT, KOLORS_TEXT)}[variant.text]
            kw = _embeddings(width=width, pooled=pooled, rows=batch, cfg=cfg, seed=seed)
        if variant.repeat_embeds:
            kw = {k: v.repeat_interleave(num_images_per_prompt, dim=0) for k, v in kw.items()}
        else:
            kw["num_images_per_prompt"] = num_images_per_prompt
        kw.update(num_inference_steps=steps, guidance_scale=cfg, output_type="latent")
    kw.update(height=SIZE, width=SIZE)
    if variant.image:
        kw.update(image=images(n_out), strength=strength)
    if variant.mask:
        kw["mask_image"] = masks(n_out)
    if variant.control:
        kw["control_image"] = images(batch, seed=12)
    accepted = inspect.signature(type(pipe).__call__).parameters
    if "height" not in accepted:  # img2img: the size is the image's
        del kw["height"], kw["width"]
    return kw | extra


def make(name: str, build: dict | None = None, **kw) -> tuple:
    """``(pipe, inputs)`` of ``VARIANTS[name]``."""
    pipe = VARIANTS[name].build(**(build or {}))
    return pipe, inputs(name, pipe, **kw)


# --- layer tables -----------------------------------------------------------------------------------------------

def _unet_attn1(block: str, attention: int, k: int = 0) -> str:
    return f"{block}.attentions.{attention}.transformer_blocks.{k}.attn1"


# The layer tables of the tiny denoiser layouts: [(name, fork unit)], heads, head dims, kind, forward units.
SD_LAYOUT = (
    [(_unet_attn1("down_blocks.0", 0), "down_blocks.0"), (_unet_attn1("down_blocks.0", 1), "down_blocks.0"),
     (_unet_attn1("mid_block", 0), "mid_block"), (_unet_attn1("up_blocks.1", 0), "up_blocks.1"),
     (_unet_attn1("up_blocks.1", 1), "up_blocks.1"), (_unet_attn1("up_blocks.1", 2), "up_blocks.1")],
    [4] * 6, [4, 4, 8, 4, 4, 4], "self",  # 16 channels in the first level, 32 in the second and the mid block
    ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
)
SDXL_LAYOUT = (
    [(_unet_attn1("down_blocks.1", 0, 0), "down_blocks.1"), (_unet_attn1("down_blocks.1", 0, 1), "down_blocks.1"),
     (_unet_attn1("mid_block", 0, 0), "mid_block"), (_unet_attn1("mid_block", 0, 1), "mid_block"),
     (_unet_attn1("up_blocks.0", 0, 0), "up_blocks.0"), (_unet_attn1("up_blocks.0", 0, 1), "up_blocks.0"),
     (_unet_attn1("up_blocks.0", 1, 0), "up_blocks.0"), (_unet_attn1("up_blocks.0", 1, 1), "up_blocks.0")],
    [4] * 8, [8] * 8, "self",
    ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
)


def block_layout(prefix: str, attention: str, n: int, heads: int, head_dim: int, kind: str) -> tuple:
    """The layout of ``n`` blocks ``{prefix}.{i}`` each holding one layer ``.{attention}``."""
    return ([(f"{prefix}.{i}.{attention}", f"{prefix}.{i}") for i in range(n)], [heads] * n, [head_dim] * n, kind,
            [f"{prefix}.{i}" for i in range(n)])


SD3_LAYOUT = block_layout("transformer_blocks", "attn", 3, 4, 8, "joint")
HUNYUAN_LAYOUT = block_layout("blocks", "attn1", 6, 2, 8, "self")
QWEN_LAYOUT = block_layout("transformer_blocks", "attn", 3, 4, 16, "joint")
