"""FLUX.2: ``Flux2Transformer2DModel`` (FLUX.2-dev, FLUX.2-klein).

- Layers: ``transformer_blocks[i].attn`` for ``i < config.num_layers`` (double-stream blocks,
  ``Flux2AttnProcessor``), then ``single_transformer_blocks[j].attn`` (layer ``num_layers + j``, the fused
  "parallel" attention + MLP of ``Flux2ParallelSelfAttnProcessor``, which still makes one attention call); all joint
  attention with the text tokens first. Fork unit: that block.
- Text tokens: ``encoder_hidden_states`` ``(B, n_text, C)``, placed before the image tokens (reference-image tokens
  of image editing are appended to the image tokens: image tokens for ``mode="image"``).
- Timesteps: the pipelines pass ``t / 1000`` (the model multiplies by 1000 again).
- Per row: ``guidance`` (distilled guidance embedding, FLUX.2-dev); the modulation tensors are computed once from
  the timestep outside the blocks and passed into every block (``temb_mod_img`` / ``temb_mod_txt`` of the double,
  ``temb_mod`` of the single blocks), so they are per-row block arguments. Shared, not per-row: ``txt_ids`` /
  ``img_ids`` (the model reads row 0 only).
- Not supported: the KV-cache processors of ``Flux2KleinKVPipeline`` (``Flux2KVAttnProcessor``, several attention
  calls per layer in "extract" mode), refused on selected layers like any non-default processor.
- Real checkpoints: FLUX.2-dev 8 + 48 = 56 layers x 48 heads of 128 (the class's config defaults, which are dev's:
  joint_attention_dim 15360 = 3 Mistral-Small layers of 5120); FLUX.2-klein-4B 5 + 20 = 25 layers x 24 heads of 128
  (its diffusers transformer/config.json).
"""

from diffusers import Flux2Transformer2DModel

from .pipelines import CallPattern, register_pipeline
from .registry import Architecture, block_list, register_architecture

FLUX2 = register_architecture(Architecture(
    Flux2Transformer2DModel, "joint", *block_list("transformer_blocks", "single_transformer_blocks", attention="attn"),
    row_args=("hidden_states", "encoder_hidden_states", "timestep", "guidance", "joint_attention_kwargs"),
    unit_row_args={
        "Flux2TransformerBlock": ("hidden_states", "encoder_hidden_states", "temb_mod_img", "temb_mod_txt",
                                  "joint_attention_kwargs"),
        "Flux2SingleTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb_mod", "joint_attention_kwargs"),
    },
    processors=("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"),
    text_arg="encoder_hidden_states", text_first=True, scheduler_timestep=lambda t: t * 1000,
))

# FLUX.2-dev: one cond call per step, no cache_context, guidance_scale is the distilled guidance embedding (no CFG);
# "separate" reads a call outside any cache context as a cond call.
register_pipeline("Flux2Pipeline", "separate")
# FLUX.2-klein: cond call under cache_context("cond"), true CFG (guidance_scale > 1, not is_distilled) as a second
# call under cache_context("uncond"); guidance_scale=1 turns CFG off.
register_pipeline("Flux2KleinPipeline", CallPattern("separate", {"guidance_scale": 1.0}))
# FLUX.2-klein inpaint: the same loop as Flux2KleinPipeline (cond / uncond calls under their cache contexts, CFG for
# guidance_scale > 1 unless is_distilled), the condition-image tokens appended to the image tokens.
register_pipeline("Flux2KleinInpaintPipeline", CallPattern("separate", {"guidance_scale": 1.0}))
