"""HunyuanVideo 1.5 text-to-video and image-to-video: ``HunyuanVideo15Transformer3DModel``.

- Layer ``i`` is ``transformer_blocks[i].attn`` (``HunyuanVideo15TransformerBlock``, double-stream MMDiT; there are
  no single-stream blocks). The attention modules of the text token refiner (``context_embedder.token_refiner``,
  text-only self-attention run once before the blocks) are not layers. Fork unit: ``transformer_blocks[i]``.
- ``HunyuanVideo15AttnProcessor2_0`` concatenates ``[video, text]`` (q, k and v; RoPE on the video tokens only)
  and makes one ``dispatch_attention_fn`` call in ``(B, N, H, D)``: joint attention with the text tokens LAST.
- The text span of the joint sequence is not ``encoder_hidden_states`` alone: the model joins, per row, the
  projected image-condition tokens (``image_embeds``: SigLIP tokens in image-to-video, 729 all-zero and fully masked
  tokens in text-to-video), the ByT5 glyph tokens (``encoder_hidden_states_2``) and the Qwen2.5-VL tokens
  (``encoder_hidden_states``), each row's valid tokens first and its padding after. Its length is the same for
  every row: ``image_embeds.shape[1] + encoder_hidden_states_2.shape[1] + encoder_hidden_states.shape[1]``
  (``Architecture.text_length``). ``mode="joint"``: the identity over the whole sequence; ``mode="image"``: a video
  query attends to itself and to the whole text span (image-condition tokens included: they are conditioning, not
  perturbed), text rows keep their attention.
- Mask: the processor builds a query x key boolean mask ``(B, 1, N, N)`` from the per-row text masks
  (``valid_i & valid_j``, video tokens always valid) on every call, so padded text keys are left out of ``A`` and
  of the image-mode ``P`` as SDPA leaves them out; a padded text query (every key masked) gets 0 from ``A`` as from
  SDPA. Padded text tokens never reach a valid token (they are masked as keys at every layer).
- Per row: ``hidden_states`` ``(B, 2 C + 1, F, H, W)`` (noise latents, the conditioning latents and a mask, all zero
  in text-to-video), ``timestep``, ``timestep_r`` (MeanFlow models), both text embeddings and their masks,
  ``image_embeds``; inside the blocks ``temb`` ``(B, D)`` and the reordered text ``attention_mask``. Shared: the
  RoPE table ``(cos, sin)`` of the video tokens (``freqs_cis``). The model switches text-to-video handling on
  ``torch.all(image_embeds == 0)`` over the whole batch, which the twins (copies of cond rows) never change.
- Timesteps: the scheduler's, passed as they are, ``(B,)``.
- The pipelines run diffusers' guider (``pipe.guider``, ``ClassifierFreeGuidance``): each step a cond call under
  ``transformer.cache_context("pred_cond")`` and, when the guider's CFG is on for the step, an uncond call under
  ``cache_context("pred_uncond")`` (shifted by the cond call's delta). CFG is on and off through the guider only
  (``guidance_scale`` 1.0, ``enabled=False`` or its ``start`` / ``stop``), not through a pipeline argument, so the
  pattern's ``cfg_off`` is empty. Refused at the first guided call: any other guider class (PAG, skip-layer,
  APG, CFG-Zero*, ...: other predictions or a combination the delta does not pass through linearly) and
  ``guidance_rescale > 0`` (the guider rescales against the cond prediction it is handed, the moved one).
  ``use_original_formulation`` is exact (the delta is added to both rows).
- Real checkpoints (diffusers' ``scripts/convert_hunyuan_video1_5_to_diffusers.py``, ``TRANSFORMER_CONFIGS``; the
  class's config defaults): 480p / 720p text-to-video and image-to-video, distilled or not, 54 layers x 16 heads
  of 128.
"""

from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.guiders import ClassifierFreeGuidance

from .pipelines import CallPattern, RowLayout, register_pipeline
from .registry import Architecture, block_list, register_architecture

_TEXT_PARTS = ("image_embeds", "encoder_hidden_states_2", "encoder_hidden_states")


def _text_length(arguments) -> int:
    """Tokens of the joint sequence's text span: image-condition + ByT5 + Qwen tokens (each padded per call)."""
    return sum(int(arguments[name].shape[1]) for name in _TEXT_PARTS if arguments.get(name) is not None)


HUNYUANVIDEO15 = register_architecture(Architecture(
    HunyuanVideo15Transformer3DModel, "joint", *block_list("transformer_blocks", attention="attn"),
    row_args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "timestep_r",
              "encoder_hidden_states_2", "encoder_attention_mask_2", "image_embeds", "attention_kwargs"),
    unit_row_args={"HunyuanVideo15TransformerBlock": ("hidden_states", "encoder_hidden_states", "temb",
                                                      "attention_mask")},
    processors=("HunyuanVideo15AttnProcessor2_0",),
    text_arg="encoder_hidden_states", text_first=False, text_length=_text_length,
))


#: The cache-context names diffusers' ``ClassifierFreeGuidance`` gives its cond and uncond calls.
COND, UNCOND = "pred_cond", "pred_uncond"


class GuiderCalls(CallPattern):
    """A loop driven by diffusers' ``ClassifierFreeGuidance`` guider (``pipe.guider``): the cond rows in a call under
    ``cache_context("pred_cond")``, then, with CFG on for the step, the uncond rows under ``("pred_uncond")``,
    which gets the cond call's delta. A call under no context (the denoiser called directly) is a cond call."""

    def layout(self, pipe, denoiser, arguments, batch: int, context: str | None) -> RowLayout | None:
        if context is not None:
            check_guider(pipe)
        if context in (None, COND):
            return RowLayout(batch, range(batch), None)
        if context == UNCOND:
            return None
        raise ValueError(
            f"{type(pipe).__name__} called its denoiser under cache_context({context!r}): headpag knows the "
            f"{COND!r} and {UNCOND!r} calls of ClassifierFreeGuidance only"
        )


def check_guider(pipe) -> None:
    """Refuses a guider whose combination headpag's fold does not pass through exactly."""
    guider = getattr(pipe, "guider", None)
    if not isinstance(guider, ClassifierFreeGuidance) or type(guider).forward is not ClassifierFreeGuidance.forward:
        raise ValueError(
            f"{type(pipe).__name__}.guider is a {type(guider).__name__}: headpag guides the loop of diffusers' "
            f"ClassifierFreeGuidance guider only (other guiders make other predictions or combine them non-linearly, "
            f"e.g. diffusers' own PerturbedAttentionGuidance); set pipe.guider = ClassifierFreeGuidance(...)"
        )
    if guider.guidance_rescale > 0:
        raise ValueError(
            f"guidance_rescale={guider.guidance_rescale} on {type(pipe).__name__}.guider is not supported with "
            f"headpag: the guider rescales against the cond prediction it is handed, which headpag has moved; "
            f"use pipe.guider = pipe.guider.new(guidance_rescale=0.0)"
        )


GUIDER_CALLS = GuiderCalls("guider", {})
for _pipeline in ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"):
    register_pipeline(_pipeline, GUIDER_CALLS)
