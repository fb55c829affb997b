"""AuraFlow: ``AuraFlowTransformer2DModel``.

- Layers: ``joint_transformer_blocks[i].attn`` for ``i < config.num_mmdit_layers`` (MMDiT blocks, text and image
  streams with their own projections), then ``single_transformer_blocks[j].attn`` (layer ``num_mmdit_layers + j``,
  DiT blocks over the concatenated ``[text, image]`` sequence); all joint attention with the text tokens first
  (``AuraFlowAttnProcessor2_0``: one ``F.scaled_dot_product_attention`` call in ``(B, H, N, D)``). Fork unit: that
  block.
- Text tokens: ``encoder_hidden_states`` ``(B, n_text, C)``, to which the model prepends its 8 learned register
  tokens: the joint sequence holds ``8 + n_text`` text-side tokens before the image tokens. ``mode="image"`` keeps
  the identity on the image-image block only (register and text tokens are attended as usual).
- Timesteps: ``AuraFlowPipeline`` passes ``t / 1000``.
- Masks: none reach the attention. The pipeline multiplies padded prompt embeddings by their mask (zeros) but
  never passes a mask to the transformer, whose forward takes none.
- Real checkpoints: AuraFlow v0.1-v0.3 4 + 32 = 36 layers x 12 heads of 256 (diffusers' class defaults,
  ``num_mmdit_layers=4, num_single_dit_layers=32, num_attention_heads=12, attention_head_dim=256``, which are
  fal/AuraFlow's transformer config).
- Pipelines: ``AuraFlowPipeline`` makes one call per step, rows ``[uncond, cond]`` under CFG (``guidance_scale >
  1``, default 3.5), a local of its ``__call__``.
"""

from __future__ import annotations

from diffusers import AuraFlowTransformer2DModel

from .pipelines import register_pipeline
from .registry import Architecture, block_list, register_architecture

#: ``AuraFlowTransformer2DModel.register_tokens``: 8 learned tokens prepended to the text tokens (fixed in __init__).
REGISTER_TOKENS = 8

AURAFLOW = register_architecture(Architecture(
    AuraFlowTransformer2DModel, "joint",
    *block_list("joint_transformer_blocks", "single_transformer_blocks", attention="attn"),
    row_args=("hidden_states", "encoder_hidden_states", "timestep", "attention_kwargs"),
    unit_row_args={"AuraFlowJointTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb",
                                                     "attention_kwargs"),
                   "AuraFlowSingleTransformerBlock": ("hidden_states", "temb", "attention_kwargs")},
    processors=("AuraFlowAttnProcessor2_0",),
    text_arg="encoder_hidden_states", text_first=True, scheduler_timestep=lambda t: t * 1000,
    text_length=lambda arguments: arguments["encoder_hidden_states"].shape[1] + REGISTER_TOKENS,
))

register_pipeline("AuraFlowPipeline", "uncond_cond_local")
