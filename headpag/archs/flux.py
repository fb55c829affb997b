"""FLUX.1: ``FluxTransformer2DModel``.

- Layers: ``transformer_blocks[i].attn`` for ``i < config.num_layers`` (double-stream blocks), then
  ``single_transformer_blocks[j].attn`` (layer ``num_layers + j``); all joint attention with the text tokens
  first. Fork unit: that block.
- Text tokens: ``encoder_hidden_states`` ``(B, n_text, C)``, placed before the image tokens.
- Timesteps: ``FluxPipeline`` passes ``t / 1000``.
- Shared, not per-row: ``txt_ids`` / ``img_ids`` (the RoPE table) stay as they are; ``guidance`` (distilled
  guidance embedding) is per row.
- Real checkpoints: FLUX.1-dev 19 + 38 = 57 layers x 24 heads of 128.
- Pipelines: ``FluxPipeline`` names its true-CFG calls with ``cache_context("cond")`` / ``("uncond")``; the other
  true-CFG pipelines (img2img, inpaint, Kontext, ControlNet) make the same two calls per step without naming them:
  :class:`SeparateCalls` tells them apart. Fill's ``hidden_states`` carry the masked-image latents as extra
  channels, Kontext's the reference-image tokens after the image tokens (both per row, nothing to add); the
  ControlNet residual lists are per-row arguments (their tensors get the twins at entry).
"""

from __future__ import annotations

from diffusers import FluxTransformer2DModel

from .blocks import TRANSFORMER_BLOCK_ROW_ARGS
from .pipelines import SeparateCalls, caller_local, register_pipeline
from .registry import Architecture, block_list, register_architecture

FLUX = register_architecture(Architecture(
    FluxTransformer2DModel, "joint", *block_list("transformer_blocks", "single_transformer_blocks", attention="attn"),
    row_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
              "joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples"),
    unit_row_args=dict.fromkeys(("FluxTransformerBlock", "FluxSingleTransformerBlock"), TRANSFORMER_BLOCK_ROW_ARGS),
    processors=("FluxAttnProcessor", "FluxIPAdapterAttnProcessor"),
    text_arg="encoder_hidden_states", text_first=True, scheduler_timestep=lambda t: t * 1000,
))

register_pipeline("FluxPipeline", "separate")  # true CFG: the uncond rows in a call of their own


#: Flux's true-CFG pipelines without cache contexts: CFG is the ``do_true_cfg`` local of their ``__call__``.
SEPARATE_TRUE_CFG = SeparateCalls("separate_calls", {}, cfg=lambda pipe: bool(caller_local(pipe, "do_true_cfg", False)))

for _pipeline in ("FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline", "FluxControlNetPipeline"):
    register_pipeline(_pipeline, SEPARATE_TRUE_CFG)
register_pipeline("FluxFillPipeline", "separate")  # no true CFG: one cond call per step

# FLUX.1 Control (Canny/Depth): the control latents are concatenated to ``hidden_states`` as extra channels (per row,
# nothing to add); one cond call per step, no true CFG. The ControlNet img2img / inpaint loops likewise make one
# transformer call per step (the FluxControlNetModel call before it is not the denoiser's), without true CFG.
for _pipeline in ("FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline",
                  "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline"):
    register_pipeline(_pipeline, "separate")
# Kontext inpaint: true CFG (``do_true_cfg`` local) as a second, unnamed call on the same ``latent_model_input``.
register_pipeline("FluxKontextInpaintPipeline", SEPARATE_TRUE_CFG)
