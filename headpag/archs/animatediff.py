"""AnimateDiff: ``UNetMotionModel`` (an SD1.5 / SDXL UNet with AnimateDiff motion modules).

- Layers: the spatial self-attention ``attn1`` of the transformer blocks in the ``attentions`` of ``down_blocks``,
  ``mid_block`` and ``up_blocks``, in forward order. Cross-attention ``attn2`` and the motion modules' temporal
  attention (``*.motion_modules.*``, whose ``attn1`` and ``attn2`` are both self-attention over the frames at one
  pixel) are never layers. A layer attends over the image tokens of one frame; its heads are perturbed in every
  frame alike.
- Fork unit: the whole down block, the mid block or the whole up block holding the layer, as for the UNets of
  ``unet.py`` (a later ``resnets[j]`` of the same block runs after ``attentions[j-1]``; up blocks take skips).
- Frames in the batch: the model folds a ``(B, C, F, H, W)`` sample into ``B * F`` frame rows (each sample's frames
  consecutive) before its first block, so every per-row tensor inside it, and the prompt embeddings
  ``AnimateDiffPipeline`` passes (already repeated per frame), have ``B * F`` rows: ``rows_per_sample`` is ``F``,
  read from the sample.
- No joint attention: ``mode="joint"`` and ``"image"`` both mean the identity over the frame's image tokens.
- Timesteps: the scheduler's, passed as they are (one for all rows).
- Real checkpoints: AnimateDiff motion adapters on SD1.5 (``UNetMotionModel.from_unet2d``): SD1.5's spatial layers,
  16 x 8 heads (head dims 40 / 80 / 160); on SDXL (``AnimateDiffSDXLPipeline``, not registered here): SDXL's 70 x
  10 / 20 heads of 64.

"""

from diffusers import UNetMotionModel

from .blocks import CROSS_ATTENTION_ARGS, RESNET_ARGS, SKIP_ARGS
from .pipelines import CallPattern, register_pipeline
from .registry import Architecture, register_architecture
from .unet import down_mid_up_units, self_attention_layers

def _frames(arguments) -> int:
    """Frame rows per sample: ``F`` of the ``(B, C, F, H, W)`` sample."""
    return int(arguments["sample"].shape[2])


ANIMATEDIFF = register_architecture(Architecture(
    UNetMotionModel, "self", lambda model: self_attention_layers(model, within="attentions."), down_mid_up_units,
    sample_arg="sample", processors=("AttnProcessor2_0",),
    row_args=("sample", "timestep", "encoder_hidden_states", "timestep_cond", "attention_mask",
              "cross_attention_kwargs", "added_cond_kwargs", "down_block_additional_residuals",
              "mid_block_additional_residual"),
    unit_row_args={
        "CrossAttnDownBlockMotion": (*RESNET_ARGS, *CROSS_ATTENTION_ARGS, "additional_residuals"),
        "DownBlockMotion": RESNET_ARGS,
        "UNetMidBlockCrossAttnMotion": (*RESNET_ARGS, *CROSS_ATTENTION_ARGS),
        "UNetMidBlock2DCrossAttn": (*RESNET_ARGS, *CROSS_ATTENTION_ARGS),  # an adapter without a mid-block motion module
        "CrossAttnUpBlockMotion": (*RESNET_ARGS, *SKIP_ARGS, *CROSS_ATTENTION_ARGS),
        "UpBlockMotion": (*RESNET_ARGS, *SKIP_ARGS),
    },
    rows_per_sample=_frames,
))


register_pipeline("AnimateDiffPipeline", CallPattern("uncond_cond", {"guidance_scale": 1.0}))
