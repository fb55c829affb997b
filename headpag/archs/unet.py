"""Stable Diffusion 1.x / 2.x / XL UNets: ``UNet2DConditionModel``.

- Layers: the self-attention ``attn1`` modules of ``down_blocks``, ``mid_block`` and ``up_blocks``, in that
  (forward) order; cross-attention ``attn2`` is never a layer. ``named_modules()`` lists ``up_blocks`` before
  ``mid_block`` (registration order), so the order is built explicitly.
- Fork unit: the whole down block, the mid block, or the whole up block holding the layer. A fork inside a down
  block is not safe: in ``CrossAttnDownBlock2D`` a later ``resnets[j]`` runs after ``attentions[j-1]`` with the
  block's own unwidened ``temb`` (SD1.5 has ``layers_per_block=2``); up blocks concatenate skip tensors.
- No joint attention: ``mode="joint"`` and ``"image"`` both mean the identity over the image tokens.
- Real checkpoints: SD1.5 16 layers x 8 heads (head dims 40 / 80 / 160); SDXL 70 layers x 10 / 20 heads of 64.
"""

from typing import Iterator

from diffusers import UNet2DConditionModel
from torch import nn

from .pipelines import register_pipeline
from .registry import Architecture, register_architecture


def _units(model: nn.Module) -> list[str]:
    units = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    units += ["mid_block"] if model.mid_block is not None else []
    return units + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]


def _layers(model: nn.Module) -> Iterator[tuple[str, str]]:
    for unit in _units(model):
        # Inside one block, registration order is forward order (attentions[0], [1], ...; blocks in order).
        for sub, module in model.get_submodule(unit).named_modules():
            if sub.rsplit(".", 1)[-1] == "attn1" and not getattr(module, "is_cross_attention", False):
                yield f"{unit}.{sub}", unit


_CROSS_ATTENTION = ("encoder_hidden_states", "attention_mask", "cross_attention_kwargs", "encoder_attention_mask")
_RESNET = ("hidden_states", "temb")
_SKIPS = ("res_hidden_states_tuple",)

UNET = register_architecture(Architecture(
    UNet2DConditionModel, "self", _layers, _units, sample_arg="sample", processors=("AttnProcessor2_0",),
    row_args=("sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
              "cross_attention_kwargs", "added_cond_kwargs", "down_block_additional_residuals",
              "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask"),
    unit_row_args={
        "CrossAttnDownBlock2D": (*_RESNET, *_CROSS_ATTENTION, "additional_residuals"),
        "DownBlock2D": _RESNET,
        "UNetMidBlock2DCrossAttn": (*_RESNET, *_CROSS_ATTENTION),
        "UNetMidBlock2D": _RESNET,
        "CrossAttnUpBlock2D": (*_RESNET, *_SKIPS, *_CROSS_ATTENTION),
        "UpBlock2D": (*_RESNET, *_SKIPS),
    },
))

for _pipeline in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionControlNetPipeline",
                  "StableDiffusionXLControlNetPipeline"):
    register_pipeline(_pipeline, "uncond_cond")

# Image-conditioned variants and Kolors (an SDXL-layout UNet with ChatGLM text): the same [uncond, cond] loop.
for _pipeline in ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                  "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                  "StableDiffusionControlNetInpaintPipeline", "StableDiffusionXLControlNetImg2ImgPipeline",
                  "KolorsPipeline", "KolorsImg2ImgPipeline"):
    register_pipeline(_pipeline, "uncond_cond")
