"""CogView4: ``CogView4Transformer2DModel``.

- Layer ``i`` is ``transformer_blocks[i].attn1`` (``CogView4TransformerBlock``): joint attention over the text
  tokens then the image tokens (``CogView4AttnProcessor`` concatenates ``[text, image]``, RoPE on the image part
  only, one ``F.scaled_dot_product_attention`` call in ``(B, H, N, D)``). Fork unit: ``transformer_blocks[i]``.
- Text tokens: ``encoder_hidden_states`` ``(B, n_text, C)``, placed before the image tokens; in ``mode="image"``
  the identity covers the image-image block of those joint maps.
- Timesteps: the scheduler's, passed as they are.
- ``attention_mask`` (text padding mask, per row) reaches every layer only when a caller passes it to the
  transformer: ``CogView4Pipeline`` and ``CogView4ControlPipeline`` never do (their prompts are left-padded with
  pad tokens to a multiple of 16 and attended unmasked), so in normal use the layers see no mask; a direct call
  with one gets it in the perturbed attention as in SDPA. ``image_rotary_emb`` (the RoPE table) is shared, not per row.
- Real checkpoints: CogView4-6B 28 layers x 32 heads of 128 (the transformer config of diffusers'
  scripts/convert_cogview4_to_diffusers.py; the class defaults, 30 x 64 x 40, are no released checkpoint).
- Pipelines: ``CogView4Pipeline`` runs the cond rows under ``cache_context("cond")`` and, with CFG
  (``guidance_scale > 1``, default 5), the uncond rows in a second call under ``cache_context("uncond")``;
  ``CogView4ControlPipeline`` makes the same two calls on the same sample tensor without naming them.
"""

from __future__ import annotations

from diffusers import CogView4Transformer2DModel

from .pipelines import CallPattern, SeparateCalls, register_pipeline
from .registry import Architecture, block_list, register_architecture

COGVIEW4 = register_architecture(Architecture(
    CogView4Transformer2DModel, "joint", *block_list("transformer_blocks", attention="attn1"),
    row_args=("hidden_states", "encoder_hidden_states", "timestep", "original_size", "target_size", "crop_coords",
              "attention_kwargs", "attention_mask"),
    unit_row_args={"CogView4TransformerBlock": ("hidden_states", "encoder_hidden_states", "temb", "attention_mask",
                                                "attention_kwargs")},
    processors=("CogView4AttnProcessor",),
    text_arg="encoder_hidden_states", text_first=True,
))

register_pipeline("CogView4Pipeline", CallPattern("separate", {"guidance_scale": 1.0}))
register_pipeline("CogView4ControlPipeline", SeparateCalls(
    "separate_calls", {"guidance_scale": 1.0}, cfg=lambda pipe: bool(pipe.do_classifier_free_guidance)))
