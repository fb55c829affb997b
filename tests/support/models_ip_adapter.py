"""Tiny pipelines with an IP-Adapter loaded offline: random IP-Adapter state dicts (an ``image_proj`` part and an
``ip_adapter`` part, the layout of the published checkpoints) shaped for the tiny models of :mod:`support.models`,
loaded with the pipeline's own ``load_ip_adapter`` (a state dict instead of a hub id, no image encoder), and the
image embeddings of one call (``ip_adapter_image_embeds``; negatives for CFG).

- SD3: ``SD3IPAdapterJointAttnProcessor2_0`` on every joint layer, ``IPAdapterTimeImageProjection`` (timestep-
  conditioned resampler) as ``transformer.image_proj``; the embeddings reach the transformer in
  ``joint_attention_kwargs`` (``[negative, positive]`` rows with CFG).
- Flux: ``FluxIPAdapterAttnProcessor`` on the double-stream blocks (single blocks keep theirs), ``ImageProjection``
  in ``transformer.encoder_hid_proj``; one list of embeddings per true-CFG call (cond, then negative).
- SD1.5 / SDXL UNets: ``IPAdapterAttnProcessor2_0`` on every cross-attention ``attn2`` (headpag's layers, the
  ``attn1`` self-attentions, keep ``AttnProcessor2_0``), ``ImageProjection`` in ``unet.encoder_hid_proj``; the
  embeddings reach the UNet in ``added_cond_kwargs["image_embeds"]``.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, IPAdapterTimeImageProjection

from . import models as M

IMAGE_DIM = 16  # width of the (CLIP) image embedding the adapters project
SD3_IMAGE_TOKENS = 3  # image tokens per embedding of SD3's resampler input


def _seeded(seed: int):
    return torch.Generator().manual_seed(seed)


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.3) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every tensor redrawn (seeded), so that the adapter visibly changes the output."""
    g = _seeded(seed)
    return {k: torch.randn(v.shape, generator=g) * std for k, v in module.state_dict().items()}


# --- SD3 -------------------------------------------------------------------------------------------------------


def sd3_ip_state_dict(transformer, *, seed: int = 7) -> dict[str, dict[str, torch.Tensor]]:
    """An SD3 IP-Adapter for ``transformer``: diffusers' key layout (``{layer}.norm_ip...``, ``{layer}.to_k_ip...``;
    the resampler's ``proj_in``, ``latents``, ``layers.{i}.attn.to_q``, ...). The resampler has one head of 64."""
    width = transformer.config.attention_head_dim * transformer.config.num_attention_heads
    proj = IPAdapterTimeImageProjection(embed_dim=IMAGE_DIM, output_dim=width, hidden_dim=64, heads=1, num_queries=4,
                                        timestep_in_dim=32)
    image_proj = _randomise(proj, seed, std=0.2)
    image_proj |= {k: torch.ones_like(v) for k, v in image_proj.items() if k.endswith(("ln0.weight", "ln1.weight",
                                                                                        "norm_out.weight"))}
    ip_adapter = {}
    for i in range(len(transformer.attn_processors)):
        processor = SD3IPAdapterJointAttnProcessor2_0(hidden_size=width, ip_hidden_states_dim=width,
                                                      head_dim=transformer.config.attention_head_dim,
                                                      timesteps_emb_dim=64)
        ip_adapter |= {f"{i}.{k}": v for k, v in _randomise(processor, seed + 1 + i).items()}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def sd3_ip(*, seed: int = 0, **build):
    """:func:`support.models.sd3` with an SD3 IP-Adapter loaded (every joint layer's processor replaced)."""
    pipe = M.sd3(seed=seed, **build)
    pipe.load_ip_adapter(sd3_ip_state_dict(pipe.transformer), weight_name="ip-adapter.safetensors",
                         image_encoder_folder=None)
    return pipe


def sd3_ip_inputs(*, cfg: float = 5.0, seed: int = 11, **kwargs) -> dict:
    """:func:`support.models.sd3_inputs` plus ``ip_adapter_image_embeds``: ``(2, n, IMAGE_DIM)`` (negative, positive)
    with CFG, ``(1, n, IMAGE_DIM)`` without (the pipeline repeats them for the batch)."""
    rows = 2 if cfg > 1 else 1
    embeds = torch.randn(rows, SD3_IMAGE_TOKENS, IMAGE_DIM, generator=_seeded(seed))
    return M.sd3_inputs(cfg=cfg, **kwargs) | {"ip_adapter_image_embeds": embeds}


# --- Flux ------------------------------------------------------------------------------------------------------


def _image_projection_state(cross_attention_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """diffusers' ``ImageProjection`` (4 tokens) in the checkpoints' naming (``proj.*``, ``norm.*``)."""
    proj = ImageProjection(image_embed_dim=IMAGE_DIM, cross_attention_dim=cross_attention_dim, num_image_text_embeds=4)
    state = _randomise(proj, seed)
    state["norm.weight"] = torch.ones_like(state["norm.weight"])
    return {k.replace("image_embeds", "proj"): v for k, v in state.items()}


def flux_ip_state_dict(transformer, *, seed: int = 7) -> dict[str, dict[str, torch.Tensor]]:
    """A Flux IP-Adapter: ``{block}.to_k_ip / to_v_ip`` (weights and biases) of each double-stream block."""
    cross, inner = transformer.config.joint_attention_dim, transformer.inner_dim
    g = _seeded(seed + 1)
    ip_adapter = {}
    for i in range(len(transformer.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{i}.{name}.weight"] = torch.randn(inner, cross, generator=g) * 0.3
            ip_adapter[f"{i}.{name}.bias"] = torch.randn(inner, generator=g) * 0.3
    return {"image_proj": _image_projection_state(cross, seed), "ip_adapter": ip_adapter}


def flux_ip(*, seed: int = 0):
    """:func:`support.models.flux` with a Flux IP-Adapter loaded on its double-stream block."""
    pipe = M.flux(seed=seed)
    pipe.load_ip_adapter(flux_ip_state_dict(pipe.transformer), weight_name="ip-adapter.safetensors",
                         image_encoder_pretrained_model_name_or_path=None)
    return pipe


def flux_ip_inputs(*, seed: int = 11, **kwargs) -> dict:
    """:func:`support.models.flux_inputs` plus one positive and one negative embedding ``(1, 1, IMAGE_DIM)`` (one
    image; the pipeline repeats them for the batch)."""
    g = _seeded(seed)
    embeds, negative = (torch.randn(1, 1, IMAGE_DIM, generator=g) for _ in range(2))
    return M.flux_inputs(**kwargs) | {"ip_adapter_image_embeds": [embeds],
                                      "negative_ip_adapter_image_embeds": [negative]}


# --- SD1.5 / SDXL UNets ----------------------------------------------------------------------------------------


def unet_ip_state_dict(unet, *, seed: int = 7) -> dict[str, dict[str, torch.Tensor]]:
    """A UNet IP-Adapter: ``{key}.to_k_ip / to_v_ip`` weights of each cross-attention processor, ``key`` the odd
    numbers 1, 3, ... in ``attn_processors`` order (diffusers' numbering: attn1, attn2 pairs)."""
    cross = unet.config.cross_attention_dim
    g = _seeded(seed + 1)
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for part in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{key}.{part}.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
        key += 2
    return {"image_proj": _image_projection_state(cross, seed), "ip_adapter": ip_adapter}


def _load_unet_ip(pipe):
    pipe.load_ip_adapter(unet_ip_state_dict(pipe.unet), subfolder="", weight_name="ip-adapter.safetensors",
                         image_encoder_folder=None)
    return pipe


def sd15_ip(*, seed: int = 0):
    """:func:`support.models.sd15` with an IP-Adapter on every cross-attention layer."""
    return _load_unet_ip(M.sd15(seed=seed))


def sdxl_ip(*, seed: int = 0):
    """:func:`support.models.sdxl` with an IP-Adapter on every cross-attention layer."""
    return _load_unet_ip(M.sdxl(seed=seed))


def unet_ip_embeds(*, cfg: float, seed: int = 11) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` of the SD pipelines: one ``(rows, 1, IMAGE_DIM)`` tensor per adapter (one image),
    rows ``[negative, positive]`` with CFG, ``[positive]`` without; the pipelines repeat each half for every image of
    the batch."""
    rows = 2 if cfg > 1 else 1
    return [torch.randn(rows, 1, IMAGE_DIM, generator=_seeded(seed))]


def sd15_ip_inputs(*, cfg: float = 5.0, **kwargs) -> dict:
    return M.sd15_inputs(cfg=cfg, **kwargs) | {"ip_adapter_image_embeds": unet_ip_embeds(cfg=cfg)}


def sdxl_ip_inputs(*, cfg: float = 5.0, **kwargs) -> dict:
    return M.sdxl_inputs(cfg=cfg, **kwargs) | {"ip_adapter_image_embeds": unet_ip_embeds(cfg=cfg)}


def without_ip(inputs: dict) -> dict:
    """The same call without its IP-Adapter embeddings (the adapter's layers then add nothing)."""
    return {k: v for k, v in inputs.items() if "ip_adapter" not in k}
