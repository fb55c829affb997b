"""LTX-Video (0.9.x): ``LTXVideoTransformer3DModel``.

- Layer ``i`` is ``transformer_blocks[i].attn1``: self-attention over the video tokens (latent frames x spatial
  patches, frame-major, packed ``(B, N, C)``; no text tokens). Text enters through the cross-attention ``attn2``, never
  a layer. Fork unit: ``transformer_blocks[i]``. No joint attention: ``mode="joint"`` and ``"image"`` both mean the
  identity over the video tokens.
- ``attn1`` runs ``LTXVideoAttnProcessor``: one ``dispatch_attention_fn`` call in ``(B, N, H, D)``, no mask (the block
  passes none to ``attn1``), RoPE applied before it. The RoPE tables ``(B, N, D)`` are computed once per call from the
  batch (or from ``video_coords``), so they are per row inside the blocks.
- Per row: ``hidden_states``, ``encoder_hidden_states`` (T5 text), ``encoder_attention_mask`` (the text padding mask
  ``(B, T)``, turned into an additive ``(B, 1, T)`` bias for ``attn2``), ``timestep`` (``(B,)``; image-to-video and
  the condition pipelines pass one per token, ``(B, N)`` or ``(B, N, 1)``, 0 on the conditioning tokens) and
  ``video_coords`` (``(B, 3, N)``: the condition and long multi-prompt pipelines' RoPE positions; a single row is
  shared). ``rope_interpolation_scale`` (three numbers) is not per row. Inside the blocks: ``hidden_states``,
  ``encoder_hidden_states``, ``temb``, ``image_rotary_emb``, ``encoder_attention_mask``.
- Timesteps: the pipelines pass the scheduler's timestep as it is (``sigma * 1000``); per-token timesteps map back to
  each row's maximum (the conditioning tokens, at 0 or below ``t``, come first or are masked).
- Pipelines: ``LTXPipeline``, ``LTXImageToVideoPipeline`` and ``LTXConditionPipeline`` make one call per step with
  rows ``[uncond, cond]`` under CFG (``guidance_scale > 1``, default 3) or ``[cond]`` (``uncond_cond``; the loops are
  read as that pattern too). ``guidance_rescale`` is honoured against the unperturbed cond prediction
  (``guided/rescale.py``) as long as the prediction the loop rescales is the denoiser's own tensor: LTXPipeline and
  LTXImageToVideoPipeline cast it with ``.float()`` first, which is the same tensor for a float32 transformer only.
  With a bfloat16 / float16 transformer the rescale measures the moved cond rows (inexact, not refused: the family
  cannot see it; ``rescale.py`` would have to compare in the wider dtype; ``tests/guided/test_ltx.py`` marks it xfail).
- Real checkpoints (diffusers' ``scripts/convert_ltx_to_diffusers.py``): LTX-Video 0.9.0 - 0.9.6 (2B; the class
  defaults) 28 layers x 32 heads of 64; LTX-Video 0.9.7 / 0.9.8 13B 48 layers x 32 heads of 128.
"""

import torch
from diffusers import LTXVideoTransformer3DModel

from .pipelines import register_pipeline
from .registry import Architecture, block_list, register_architecture


def _scheduler_timestep(timestep):
    """Per-token timesteps ``(B, N)`` / ``(B, N, 1)`` back to each row's scheduler timestep, the largest entry;
    ``(B,)`` passes as it is."""
    if isinstance(timestep, torch.Tensor) and timestep.dim() >= 2:
        return timestep.flatten(1).amax(dim=1)
    return timestep


LTX = register_architecture(Architecture(
    LTXVideoTransformer3DModel, "self", *block_list("transformer_blocks", attention="attn1"),
    row_args=("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "video_coords",
              "attention_kwargs"),
    unit_row_args={"LTXVideoTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb",
                                                "encoder_attention_mask")},
    processors=("LTXVideoAttnProcessor",),
    scheduler_timestep=_scheduler_timestep,
))

for _pipeline in ("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"):
    register_pipeline(_pipeline, "uncond_cond")
