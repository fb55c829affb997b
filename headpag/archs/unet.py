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

from .blocks import CROSS_ATTENTION_ARGS, RESNET_ARGS, SKIP_ARGS
from .pipelines import register_pipeline
from .registry import Architecture, register_architecture


def down_mid_up_units(model: nn.Module) -> list[str]:
    """Every down block, the mid block, every up block: the forward loop of a diffusers UNet."""
    units = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    units += ["mid_block"] if model.mid_block is not None else []
    return units + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]


def self_attention_layers(model: nn.Module, within: str = "") -> Iterator[tuple[str, str]]:
    """The self-attention ``attn1`` modules (under ``within`` inside each block) with their block as fork unit."""
    for unit in down_mid_up_units(model):
        # Inside one block, registration order is forward order (attentions[0], [1], ...; blocks in order).
        for sub, module in model.get_submodule(unit).named_modules():
            if (sub.startswith(within) and sub.rsplit(".", 1)[-1] == "attn1"
                    and not getattr(module, "is_cross_attention", False)):
                yield f"{unit}.{sub}", unit


UNET = register_architecture(Architecture(
    UNet2DConditionModel, "self", self_attention_layers, down_mid_up_units, sample_arg="sample", processors=("AttnProcessor2_0",),
    row_args=("sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
              "cross_attention_kwargs", "added_cond_kwargs", "down_block_additional_residuals",
              "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask"),
    unit_row_args={
        "CrossAttnDownBlock2D": (*RESNET_ARGS, *CROSS_ATTENTION_ARGS, "additional_residuals"),
        "DownBlock2D": RESNET_ARGS,
        "UNetMidBlock2DCrossAttn": (*RESNET_ARGS, *CROSS_ATTENTION_ARGS),
        "UNetMidBlock2D": RESNET_ARGS,
        "CrossAttnUpBlock2D": (*RESNET_ARGS, *SKIP_ARGS, *CROSS_ATTENTION_ARGS),
        "UpBlock2D": (*RESNET_ARGS, *SKIP_ARGS),
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
for _pipeline in ("StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionXLControlNetInpaintPipeline"):
    register_pipeline(_pipeline, "uncond_cond")
