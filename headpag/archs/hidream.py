"""HiDream-I1 (Full, Dev, Fast): ``HiDreamImageTransformer2DModel``.

- Forward loop: ``double_stream_blocks[i]`` then ``single_stream_blocks[j]``, each a ``HiDreamBlock`` wrapping the
  real block (``.block``). Layers: ``double_stream_blocks[i].block.attn1`` for ``i < config.num_layers`` (image and
  text streams with their own projections), then ``single_stream_blocks[j].block.attn1`` (layer ``num_layers + j``,
  one stream over the joined sequence); all ``HiDreamAttention`` with ``HiDreamAttnProcessor`` (q/k RMS norms,
  RoPE, one ``F.scaled_dot_product_attention`` call in ``(B, H, N, D)``, no mask). Fork unit: the ``HiDreamBlock``.
- Text tokens: the model projects the T5 tokens ``encoder_hidden_states_t5`` ``(B, n_t5, C_t5)`` and, per block, one
  layer of the Llama-3.1 hidden-state stack ``encoder_hidden_states_llama3`` ``(L, B, n_llama, C_llama)`` (layer
  ``config.llama_layers[k]`` for block ``k``). Every block's joint attention is ``[image, t5, llama_last, llama_k]``:
  the image tokens first, then ``n_text = n_t5 + 2 * n_llama`` text tokens (the T5 tokens and the last block's Llama
  layer, carried through the double blocks' text stream, then block ``k``'s own Llama layer). In the single blocks
  the same text follows the image tokens in one sequence. So text is *last*, ``n_text = n_t5 + 2 n_llama`` at every
  layer; ``mode="image"`` keeps the identity on the image-image block only.
- Per row: ``hidden_states``, ``timesteps``, ``encoder_hidden_states_t5``, ``pooled_embeds``, the Llama stack *along
  its dim 1*, and, for callers that patchify themselves (3-D ``hidden_states``), ``img_ids``, ``img_sizes``,
  ``hidden_states_masks``; inside the blocks ``hidden_states``, ``hidden_states_masks``, ``encoder_hidden_states``,
  ``temb`` and the RoPE table ``image_rotary_emb`` (built per row from the ids). The MoE feed-forward routes each
  token on its own (top-2 of 4 experts plus a shared one): per row, whatever the batch.
- The Llama stack's rows are its dim 1, which headpag's row widening (leading dim) cannot take as is: at every
  guided call, before the per-row arguments are read or widened, :func:`_per_row_layout` (the architecture's
  ``prepare_arguments``) replaces the stack in the call's bound arguments by the list of its ``L`` layers, ``(B, n_llama, C)`` each (the model only indexes it,
  ``encoder_hidden_states_llama3[k]``), so that every layer gets the twins (fused) or is narrowed to the cond rows
  (eager) row by row. ``img_sizes`` given as a list of ``(h, w)`` pairs becomes the ``(B, 2)`` tensor the model's
  own ``patchify`` makes. tests/guided/test_hidream.py checks that every layer reaches the model with the guided
  call's rows.
- Masks: none reach the attention call. Non-square latents are padded by the model to ``max_seq`` image tokens and
  the padded tokens' keys multiplied by 0 (``hidden_states_masks``), inside the processor, before attention: the
  perturbed attention sees the same ``q, k, v`` (``mode="image"`` counts the padded image tokens as image tokens).
  Prompts are padded to the pipeline's ``max_sequence_length`` without a mask.
- Timesteps: ``HiDreamImagePipeline`` passes the scheduler's ``t`` as is.
- Pipeline: ``HiDreamImagePipeline``, one call per step, rows ``[uncond, cond]`` under CFG (``guidance_scale > 1``,
  the ``do_classifier_free_guidance`` property); it negates the prediction (``noise_pred = -noise_pred``) before
  CFG, which the fold's delta, linear in the prediction, goes through unchanged.
- Real checkpoints: HiDream-I1-Full / Dev / Fast 16 + 32 = 48 layers x 20 heads of 128 (``num_layers=16,
  num_single_layers=32, num_attention_heads=20, attention_head_dim=128``: the transformer config written by
  diffusers' ``scripts/convert_hidream_to_diffusers.py``, with 48 ``llama_layers`` into Llama-3.1-8B's 32 layers).
"""

from __future__ import annotations

from typing import Any, Mapping, MutableMapping

import torch
from diffusers import HiDreamImageTransformer2DModel

from .pipelines import register_pipeline
from .registry import Architecture, block_list, register_architecture

LLAMA_ARG = "encoder_hidden_states_llama3"


def _per_row_layout(arguments: MutableMapping[str, Any]) -> None:
    """Lays the call's inputs out per row (module docstring): the ``(L, B, n, C)`` Llama stack becomes the list of its
    ``L`` layers, an ``img_sizes`` list of ``(h, w)`` the ``(B, 2)`` tensor the model's own patchify makes."""
    llama = arguments.get(LLAMA_ARG)
    if isinstance(llama, torch.Tensor):
        arguments[LLAMA_ARG] = list(llama.unbind(0))
    sizes = arguments.get("img_sizes")
    if isinstance(sizes, (list, tuple)):
        arguments["img_sizes"] = torch.as_tensor([[int(h), int(w)] for h, w in sizes], dtype=torch.int64,
                                                 device=arguments["hidden_states"].device)


def _text_length(arguments: Mapping[str, Any]) -> int:
    """``n_t5 + 2 n_llama``: the text tokens after the image tokens in every layer's attention."""
    return int(arguments["encoder_hidden_states_t5"].shape[1]) + 2 * int(arguments[LLAMA_ARG][0].shape[1])


HIDREAM = register_architecture(Architecture(
    HiDreamImageTransformer2DModel, "joint",
    *block_list("double_stream_blocks", "single_stream_blocks", attention="block.attn1"),
    row_args=("hidden_states", "timesteps", "encoder_hidden_states_t5", LLAMA_ARG, "pooled_embeds", "img_ids",
              "img_sizes", "hidden_states_masks"),
    unit_row_args={"HiDreamBlock": ("hidden_states", "hidden_states_masks", "encoder_hidden_states", "temb",
                                    "image_rotary_emb")},
    processors=("HiDreamAttnProcessor",),
    text_arg="encoder_hidden_states_t5", text_first=False, timestep_arg="timesteps", text_length=_text_length,
    prepare_arguments=_per_row_layout,
))

register_pipeline("HiDreamImagePipeline", "uncond_cond")  # one call per step, [uncond, cond] under CFG
