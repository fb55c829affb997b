"""Wan 2.1 / 2.2 text-to-video and image-to-video: ``WanTransformer3DModel``.

- Layer ``i`` is ``blocks[i].attn1``: self-attention over the video tokens (latent frames x spatial patches,
  frame-major; no text tokens). Text (and, for Wan 2.1 I2V, CLIP image tokens) enter through the cross-attention
  ``attn2``, never a layer. Fork unit: ``blocks[i]``. No joint attention: ``mode="joint"`` and ``"image"`` both
  mean the identity over the video tokens.
- ``attn1`` runs ``WanAttnProcessor``: one ``dispatch_attention_fn`` call, no mask (the block passes None), no
  added K/V (only ``attn2`` has ``add_k_proj``). Rotary embeddings are computed once per call by ``model.rope``
  as a ``(1, seq, 1, D)`` table shared by every row: not a per-row argument. The processor passes a
  ``parallel_config`` to ``attn1``'s call only under context parallelism, which headpag refuses on selected layers.
- Per row: ``hidden_states`` ``(B, C, F, H, W)`` (I2V: noise latents concatenated with the mask and the encoded
  first frame along C), ``timestep``, ``encoder_hidden_states`` (text) and ``encoder_hidden_states_image``
  (Wan 2.1 I2V CLIP tokens); inside the blocks ``temb`` (the ``timestep_proj`` of the condition embedder,
  ``(B, 6, D)``, or ``(B, seq, 6, D)`` for per-token timesteps).
- Timesteps: the scheduler's, passed as they are, ``(B,)``; with ``expand_timesteps`` (Wan 2.2 TI2V-5B) one per
  token, ``(B, seq)``, and image-to-video puts 0 on the tokens of the conditioning first frame (the first ones), so
  the scheduler timestep is the row's maximum, not its first entry.
- Wan 2.2 A14B has two transformers: ``transformer`` for the high-noise steps (``t >= boundary_ratio * 1000``) and
  ``transformer_2`` for the rest (same class and config; ``guidance_scale_2`` is the CFG scale of its steps).
  headpag guides both (``headpag.archs.denoisers_of``): one session on each, the same settings, the heads resolved
  against each, and the PAG interval read over the whole schedule (a step's position in ``scheduler.timesteps``,
  whichever transformer runs it). Each transformer's uncond call gets the delta of its own cond call of the step.
- Wan 2.1 FLF2V (first-last-frame, ``pos_embed_seq_len`` set) passes ``encoder_hidden_states_image`` with ``2 B``
  rows, each row's first- and last-frame CLIP tokens consecutive, which the model folds to ``B``: a grouped row
  argument, widened two entries per row.
- Real checkpoints (the Wan team's ``wan/configs/wan_*.py``; diffusers' defaults are the 14B ones): Wan 2.1
  T2V-1.3B 30 layers x 12 heads of 128; Wan 2.1 T2V/I2V-14B and Wan 2.2 A14B (each of its two transformers)
  40 layers x 40 heads of 128; Wan 2.2 TI2V-5B 30 layers x 24 heads of 128. 81 frames of 480x832 are 21 latent
  frames x 30 x 52 patches = 32760 tokens per row (Wan 2.1 VAE, 4x8x8).
"""

import torch
from diffusers import WanTransformer3DModel

from .pipelines import CallPattern, register_pipeline
from .registry import Architecture, block_list, register_architecture


def _scheduler_timestep(timestep):
    """Per-token timesteps ``(B, seq)`` (Wan 2.2 TI2V) back to each row's scheduler timestep: the largest entry
    (image-to-video zeroes the conditioning frame's tokens, which come first)."""
    if isinstance(timestep, torch.Tensor) and timestep.dim() == 2:
        return timestep.amax(dim=1)
    return timestep


WAN = register_architecture(Architecture(
    WanTransformer3DModel, "self", *block_list("blocks", attention="attn1"),
    row_args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image",
              "attention_kwargs"),
    unit_row_args={"WanTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb")},
    processors=("WanAttnProcessor",),
    grouped_row_args=("encoder_hidden_states_image",),
    scheduler_timestep=_scheduler_timestep,
))

# Each step: the cond rows under cache_context("cond"), then (guidance_scale > 1) the uncond rows under
# cache_context("uncond"), both through the stage's transformer (Wan 2.2 A14B: transformer or transformer_2). CFG is
# on by default (guidance_scale 5.0) and off at guidance_scale <= 1 (Wan 2.2 A14B's guidance_scale_2 defaults to
# guidance_scale).
SEPARATE_CFG = CallPattern("separate", {"guidance_scale": 1.0})
for _pipeline in ("WanPipeline", "WanImageToVideoPipeline"):
    register_pipeline(_pipeline, SEPARATE_CFG)
