"""Chroma: ``ChromaTransformer2DModel`` (FLUX.1-schnell pruned: no pooled text, no guidance embedding; the
per-block modulations come from one ``distilled_guidance_layer`` approximator).

- Layers: ``transformer_blocks[i].attn`` for ``i < config.num_layers`` (double-stream ``ChromaTransformerBlock``),
  then ``single_transformer_blocks[j].attn`` (layer ``num_layers + j``, ``ChromaSingleTransformerBlock``); all
  ``FluxAttention`` with ``FluxAttnProcessor``, joint attention with the text tokens first. Fork unit: that block.
- Text tokens: ``encoder_hidden_states`` ``(B, n_text, C)``; the double blocks put them before the image tokens in
  their joint attention, and the single blocks run on ``cat([text, image])`` (their ``hidden_states``), so
  ``mode="image"`` reads ``n_text`` from ``encoder_hidden_states`` for both kinds of block.
- Timesteps: the pipelines pass ``t / 1000`` (the model multiplies by 1000), as Flux.
- Per row: ``hidden_states``, ``encoder_hidden_states``, ``timestep``, ``attention_mask`` (the text padding mask,
  ``(B, n_text + n_image)``), ``joint_attention_kwargs``, the ControlNet residual lists; inside the blocks ``temb``
  (each row's modulations) and ``attention_mask``. ``txt_ids`` / ``img_ids`` (the RoPE table) are shared.
- Attention mask: every Chroma pipeline passes one on every denoiser call (``prompt_attention_mask`` is required
  with prompt embeddings and ``encode_prompt`` always makes it); each block turns it into a ``(B, 1, N, N)`` query x
  key mask for the attention. diffusers 0.42 builds it as float 0 / 1, which SDPA adds to the scores (a +1 on
  valid pairs, not a -inf on padded ones); the perturbed attention takes the mask exactly as SDPA does, whatever
  its dtype, so the guided step follows the pipeline's own semantics.
- Pipelines: ``ChromaPipeline``, ``ChromaImg2ImgPipeline``, ``ChromaInpaintPipeline``: CFG (``guidance_scale > 1``)
  is a cond call then an uncond call per step on the same latents, not named by ``cache_context``.
- Real checkpoints (``lodestones/Chroma1-HD``, the model's config defaults): 19 + 38 = 57 layers x 24 heads of 128.
"""

from diffusers import ChromaTransformer2DModel

from .pipelines import SeparateCalls, register_pipeline
from .registry import Architecture, block_list, register_architecture

CHROMA = register_architecture(Architecture(
    ChromaTransformer2DModel, "joint",
    *block_list("transformer_blocks", "single_transformer_blocks", attention="attn"),
    row_args=("hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "joint_attention_kwargs",
              "controlnet_block_samples", "controlnet_single_block_samples"),
    unit_row_args={
        "ChromaTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb", "attention_mask",
                                   "joint_attention_kwargs"),
        "ChromaSingleTransformerBlock": ("hidden_states", "temb", "attention_mask", "joint_attention_kwargs"),
    },
    processors=("FluxAttnProcessor",),
    text_arg="encoder_hidden_states", text_first=True, scheduler_timestep=lambda t: t * 1000,
))

#: Chroma's pipelines: CFG is their ``do_classifier_free_guidance`` property (``guidance_scale > 1``).
SEPARATE_CFG = SeparateCalls("separate_calls", {"guidance_scale": 1.0}, cfg=lambda pipe: pipe.do_classifier_free_guidance)

for _pipeline in ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"):
    register_pipeline(_pipeline, SEPARATE_CFG)
