"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel``.

- Layer ``i`` is ``transformer_blocks[i].attn``: joint attention over image tokens then text tokens (text last).
  SD3.5's dual-attention ``attn2`` (image only) is not a layer. Fork unit: ``transformer_blocks[i]``.
- Text tokens: ``encoder_hidden_states`` ``(B, n_text, C)``; in ``mode="image"`` the identity covers the
  image-image block of those joint maps.
- Timesteps: the scheduler's, passed as they are.
- A call with ``skip_layers`` is skip-layer guidance's extra pass, not an uncond / cond call.
- Real checkpoints: SD3-medium 24 layers x 24 heads of 64.
"""

from diffusers import SD3Transformer2DModel

from .blocks import TRANSFORMER_BLOCK_ROW_ARGS
from .pipelines import register_pipeline
from .registry import Architecture, block_list, register_architecture

SD3 = register_architecture(Architecture(
    SD3Transformer2DModel, "joint", *block_list("transformer_blocks", attention="attn"),
    row_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
              "block_controlnet_hidden_states", "joint_attention_kwargs"),
    unit_row_args={"JointTransformerBlock": TRANSFORMER_BLOCK_ROW_ARGS},
    processors=("JointAttnProcessor2_0", "SD3IPAdapterJointAttnProcessor2_0"),
    text_arg="encoder_hidden_states", side_pass_arg="skip_layers",
))

register_pipeline("StableDiffusion3Pipeline", "uncond_cond")  # with skip-layer guidance
# Image-conditioned variants: the same [uncond, cond] loop, no skip-layer guidance.
for _pipeline in ("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"):
    register_pipeline(_pipeline, "uncond_cond")
# ControlNet: the same [uncond, cond] loop; the SD3ControlNetModel's residuals reach the transformer per row as
# block_controlnet_hidden_states (added to the image stream after each block, outside the fork unit).
register_pipeline("StableDiffusion3ControlNetPipeline", "uncond_cond")
