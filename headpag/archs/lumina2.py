"""Lumina-Image 2.0: ``Lumina2Transformer2DModel``.

- The forward loop: ``context_refiner`` blocks (self-attention over the text tokens, always under the text padding
  mask), then ``noise_refiner`` blocks (self-attention over the image tokens), then the main ``layers`` (joint
  attention over ``[text, image]``), all ``Lumina2TransformerBlock``.
- Layer ``i`` is ``layers[i].attn``: joint attention with the text tokens first (``Lumina2AttnProcessor2_0``: RoPE,
  grouped-query K/V repeated to every head, one ``F.scaled_dot_product_attention`` call in ``(B, H, N, D)``). Fork
  unit: ``layers[i]``. The refiner blocks are forward-loop units but hold no layer: the context refiner's attention
  is text-only and always masked, and the noise refiner's is image-only, which one architecture-wide ``"joint"``
  kind cannot describe (``mode="image"`` would read its first image tokens as text).
- Text tokens: the joint sequence holds each row's *effective* caption (its first ``encoder_attention_mask.sum()``
  tokens of ``encoder_hidden_states``; padding dropped) then the image tokens: ``n_text`` is the mask's row sum.
  ``mode="image"`` keeps the identity on the image-image block.
- Masks: the pipeline always passes ``encoder_attention_mask``. The main layers get a key mask only when the rows of
  one call have different effective caption lengths (``use_mask = len(set(seq_lengths)) > 1``): row ``i`` is then
  ``[caption_i, image, padding]``, the padding masked, and the perturbed attention takes the mask like SDPA. Its
  image tokens then start at a different position in each row, so ``mode="image"`` (one text span per call) is
  refused for such a call; ``mode="joint"`` is exact. The CFG uncond call is not forked, so its negative prompt's
  length never matters.
- Timesteps: ``Lumina2Pipeline`` passes ``1 - t / 1000`` (t = 0 is noise).
- Real checkpoints: Lumina-Image-2.0 26 layers x 24 heads of 96 (8 K/V heads), plus 2 + 2 refiner blocks
  (diffusers' class defaults, which are Alpha-VLLM/Lumina-Image-2.0's transformer config).
- Pipelines: ``Lumina2Pipeline`` makes a cond call per step and, with CFG (``guidance_scale > 1``, default 4) outside
  the truncated tail (``cfg_trunc_ratio``), an uncond call on the same latents, neither named by a cache context:
  :class:`SeparateCalls`. With ``cfg_normalization`` (default) the pipeline rescales ``uncond + s (cond - uncond)``
  to ``|cond|`` per token; with the delta folded into both calls PAG's delta goes through that rescale.
"""

from __future__ import annotations

from diffusers import Lumina2Transformer2DModel

from .pipelines import SeparateCalls, caller_local, register_pipeline
from .registry import Architecture, register_architecture


def _units(model) -> list[str]:
    return [f"{name}.{i}" for name in ("context_refiner", "noise_refiner", "layers")
            for i in range(len(getattr(model, name)))]


def _layers(model):
    for i in range(len(model.layers)):
        yield f"layers.{i}.attn", f"layers.{i}"


def _text_length(arguments) -> int | None:
    """Effective caption length of the call's rows; None when they differ (each row's image tokens start elsewhere)."""
    lengths = {int(n) for n in arguments["encoder_attention_mask"].sum(dim=1)}
    return lengths.pop() if len(lengths) == 1 else None


LUMINA2 = register_architecture(Architecture(
    Lumina2Transformer2DModel, "joint", _layers, _units,
    row_args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "attention_kwargs"),
    unit_row_args={"Lumina2TransformerBlock": ("hidden_states", "attention_mask", "image_rotary_emb", "temb")},
    processors=("Lumina2AttnProcessor2_0",),
    text_arg="encoder_hidden_states", text_first=True, scheduler_timestep=lambda t: (1 - t) * 1000,
    text_length=_text_length,
))


def _true_cfg(pipe) -> bool:
    """This step makes an uncond call: CFG on and the step before the truncated tail."""
    return bool(pipe.do_classifier_free_guidance) and not caller_local(pipe, "do_classifier_free_truncation", False)


register_pipeline("Lumina2Pipeline", SeparateCalls("separate_calls", {"guidance_scale": 1.0}, cfg=_true_cfg))
