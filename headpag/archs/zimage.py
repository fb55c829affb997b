"""Z-Image: ``ZImageTransformer2DModel`` (Z-Image, Z-Image-Turbo).

- Forward loop: ``noise_refiner`` blocks (image tokens only, timestep-modulated), ``context_refiner`` blocks
  (caption tokens only), then the main ``layers`` over the unified sequence ``[image tokens, caption tokens]``.
  Layers: ``layers[i].attention`` only (one index space over the main blocks; the single-modality refiners are
  forward-loop units, run on the base rows only). Fork unit: that block.
- Text tokens: ``cap_feats``, a list of per-prompt ``(L_i, C)`` tensors; the model pads each caption to a multiple
  of 32 tokens (with a learned pad token, attended like any token) and places it *after* the image tokens (also
  padded to a multiple of 32): ``mode="image"`` reads the padded caption length as ``n_text``, text last.
- Rows: the pipelines call the denoiser with Python lists of per-sample tensors (``x``: ``(C, 1, H, W)`` each,
  ``cap_feats``), one list entry per row, rows ``[positive..., negative...]`` in one call under CFG, and get a list
  back. Per row: ``x``, ``cap_feats`` (list entries), ``t``; inside the blocks the padded tensors, rotary tables
  ``freqs_cis``, masks and the timestep embedding ``adaln_input``.
- Timesteps: the pipelines pass ``(1000 - t) / 1000``.
- Masks: the model masks the batch padding of the unified sequence when the rows' padded caption lengths differ
  (e.g. a long prompt with the short empty negative prompt under CFG): row ``i`` is ``[image, caption_i, padding]``
  with a key mask over the padding, which the perturbed attention takes like SDPA. The image tokens come first on
  every row, so ``mode="image"`` reads the text span as everything after them: the longest padded caption, whose
  padding on shorter rows is masked.
- Not supported: omni mode (``ZImageOmniPipeline``: nested lists, SigLIP tokens, per-token modulation); CFG
  renormalisation (``cfg_normalization``; it rescales against the positive prediction, which the fold has moved).
- Real checkpoints: Z-Image and Z-Image-Turbo 30 layers x 30 heads of 128 (dim 3840; their transformer/config.json,
  the class's defaults), plus 2 + 2 refiner blocks that are not layers.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from diffusers import ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF
from torch import nn

from .pipelines import CallPattern, RowLayout, caller_local, register_pipeline
from .registry import Architecture, register_architecture

_REFINERS = ("noise_refiner", "context_refiner")


def _units(model: nn.Module) -> list[str]:
    return [f"{name}.{i}" for name in (*_REFINERS, "layers") for i in range(len(getattr(model, name)))]


def _layers(model: nn.Module) -> Iterator[tuple[str, str]]:
    for i in range(len(model.layers)):
        yield f"layers.{i}.attention", f"layers.{i}"


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def _caption_length(arguments: Mapping[str, Any]) -> int:
    """Tokens after the image tokens in the unified sequence: the longest padded caption of the call (shorter rows'
    batch padding is masked)."""
    return max(_padded(len(c)) for c in arguments["cap_feats"])


ZIMAGE = register_architecture(Architecture(
    ZImageTransformer2DModel, "joint", _layers, _units,
    row_args=("x", "t", "cap_feats", "controlnet_block_samples"),
    unit_row_args={"ZImageTransformerBlock": ("x", "attn_mask", "freqs_cis", "adaln_input", "noise_mask",
                                              "adaln_noisy", "adaln_clean")},
    processors=("ZSingleStreamAttnProcessor",),
    sample_arg="x", text_arg="cap_feats", text_first=False, scheduler_timestep=lambda t: 1000 - t * 1000,
    timestep_arg="t", row_lists=("x", "cap_feats"), text_length=_caption_length,
))


@dataclass(frozen=True)
class PositiveNegativeLists(CallPattern):
    """Z-Image's loop: one call per step on lists of per-row tensors, rows ``[positive..., negative...]`` while the
    running ``__call__``'s local ``apply_cfg`` is true (CFG on and this step not truncated by ``cfg_truncation``),
    else ``[positive...]``. The pipeline's ``pos + s * (pos - neg)`` is affine in the rows, so the fold applies."""

    def layout(self, pipe, denoiser: nn.Module, arguments: Mapping[str, Any], batch: int,
               context: str | None) -> RowLayout | None:
        x = arguments["x"]
        if not isinstance(x, list) or any(isinstance(item, list) for item in x):
            raise ValueError("Z-Image's omni mode (nested lists of images, SigLIP tokens) is not supported by headpag")
        if not caller_local(pipe, "apply_cfg"):
            return RowLayout(batch, range(batch), None)
        normalization = getattr(pipe, "_cfg_normalization", False)
        if normalization and float(normalization) > 0.0:
            raise ValueError("cfg_normalization is not supported with headpag: it renormalises against the positive "
                             "prediction, which the fold has moved; call the pipeline with cfg_normalization=False")
        return RowLayout(batch, range(0, batch // 2), range(batch // 2, batch))


#: CFG is off at guidance_scale=0 (Z-Image's do_classifier_free_guidance is guidance_scale > 0; Turbo runs at 0).
POSITIVE_NEGATIVE_LISTS = PositiveNegativeLists("positive_negative_lists", {"guidance_scale": 0.0})

for _pipeline in ("ZImagePipeline", "ZImageImg2ImgPipeline"):
    register_pipeline(_pipeline, POSITIVE_NEGATIVE_LISTS)
