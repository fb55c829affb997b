"""Hunyuan-DiT: ``HunyuanDiT2DModel``.

- Layer ``i`` is ``blocks[i].attn1``: self-attention over the image tokens (q/k layer norms and 2D RoPE inside
  ``HunyuanAttnProcessor2_0``, which calls ``F.scaled_dot_product_attention`` without a mask). Text (CLIP/BERT
  tokens then T5 tokens) enters through the cross-attention ``attn2`` only, never a layer. Fork unit: ``blocks[i]``.
- No joint attention: ``mode="joint"`` and ``"image"`` both mean the identity over the image tokens.
- Long skips: block ``j < num_layers // 2 - 1`` hands its output to block ``num_layers - 1 - j`` (``skip``). Skip
  tensors are collected after each unit, so they carry the twins whether or not they were forked yet; a block
  running before the fork narrows its ``skip`` like its other per-row arguments.
- Per row: the timestep (``HunyuanDiTPipeline`` passes one per row), both text embeddings and their masks,
  ``image_meta_size``, ``style`` and ControlNet residuals. ``text_embedding_mask`` / ``text_embedding_mask_t5``
  are no attention masks: the forward only uses them to swap padded text tokens for a learned padding embedding
  before the cross-attention (``torch.where``); no mask reaches ``attn1`` or ``attn2``. ``image_rotary_emb`` (the
  RoPE table) is shared, never per row.
- Timesteps: the scheduler's, passed as they are.
- Learned sigma: the output has twice the latent channels (config ``learn_sigma``, no ``out_channels``), so the fold
  also shifts the variance half; ``HunyuanDiTPipeline`` discards that half before guidance.
- Real checkpoints: HunyuanDiT v1.0-v1.2 40 layers x 16 heads of 88 (diffusers' conversion script
  ``scripts/convert_hunyuandit_to_diffusers.py``: ``num_layers = 40``; ``HunyuanDiT2DModel`` defaults 16 x 88).
"""

from diffusers import HunyuanDiT2DModel

from .pipelines import register_pipeline
from .registry import Architecture, block_list, register_architecture

HUNYUANDIT = register_architecture(Architecture(
    HunyuanDiT2DModel, "self", *block_list("blocks", attention="attn1"),
    row_args=("hidden_states", "timestep", "encoder_hidden_states", "text_embedding_mask", "encoder_hidden_states_t5",
              "text_embedding_mask_t5", "image_meta_size", "style", "controlnet_block_samples"),
    unit_row_args={"HunyuanDiTBlock": ("hidden_states", "encoder_hidden_states", "temb", "skip")},
    processors=("HunyuanAttnProcessor2_0",),
))

register_pipeline("HunyuanDiTPipeline", "uncond_cond")
# ControlNet: the same [uncond, cond] loop (a timestep per row); the HunyuanDiT2DControlNetModel's residual list
# (controlnet_block_samples, popped by the forward) is added to the long skips of the second half.
register_pipeline("HunyuanDiTControlNetPipeline", "uncond_cond")
