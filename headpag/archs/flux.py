"""FLUX.1: ``FluxTransformer2DModel``.

- Layers: ``transformer_blocks[i].attn`` for ``i < config.num_layers`` (double-stream blocks), then
  ``single_transformer_blocks[j].attn`` (layer ``num_layers + j``); all joint attention with the text tokens
  first. Fork unit: that block.
- Text tokens: ``encoder_hidden_states`` ``(B, n_text, C)``, placed before the image tokens.
- Timesteps: ``FluxPipeline`` passes ``t / 1000``.
- Shared, not per-row: ``txt_ids`` / ``img_ids`` (the RoPE table) stay as they are; ``guidance`` (distilled
  guidance embedding) is per row.
- Real checkpoints: FLUX.1-dev 19 + 38 = 57 layers x 24 heads of 128.
- Pipelines: ``FluxPipeline`` names its true-CFG calls with ``cache_context("cond")`` / ``("uncond")``; the other
  true-CFG pipelines (img2img, inpaint, Kontext, ControlNet) make the same two calls per step without naming them:
  :class:`SeparateCalls` tells them apart. Fill's ``hidden_states`` carry the masked-image latents as extra
  channels, Kontext's the reference-image tokens after the image tokens (both per row, nothing to add); the
  ControlNet residual lists are per-row arguments (their tensors get the twins at entry).
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from diffusers import FluxTransformer2DModel
from torch import nn

from .blocks import TRANSFORMER_BLOCK_ROW_ARGS
from .pipelines import CallPattern, RowLayout, register_pipeline
from .registry import Architecture, architecture_of, block_list, register_architecture

FLUX = register_architecture(Architecture(
    FluxTransformer2DModel, "joint", *block_list("transformer_blocks", "single_transformer_blocks", attention="attn"),
    row_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
              "joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples"),
    unit_row_args=dict.fromkeys(("FluxTransformerBlock", "FluxSingleTransformerBlock"), TRANSFORMER_BLOCK_ROW_ARGS),
    processors=("FluxAttnProcessor",),
    text_arg="encoder_hidden_states", text_first=True, scheduler_timestep=lambda t: t * 1000,
))

register_pipeline("FluxPipeline", "separate")  # true CFG: the uncond rows in a call of their own


def running_local(pipe, name: str, default: Any = None) -> Any:
    """The local variable ``name`` of the innermost running method of ``pipe`` (its ``__call__``), else ``default``
    (a denoiser called outside the pipeline)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is pipe and name in frame.f_locals:
            return frame.f_locals[name]
        frame = frame.f_back
    return default


@dataclass(frozen=True)
class SeparateCalls(CallPattern):
    """``"separate"`` for loops that do not name their calls: per step a cond call, then (with true CFG) an uncond
    call on the *same* sample tensor (the loop's ``latents`` / ``latent_model_input``, rebuilt by every scheduler
    step), which gets the cond call's delta added instead of twins of its own.

    ``cfg(pipe)`` says whether the running call makes the uncond calls; a call under a named ``cache_context``
    ("cond" / "uncond") is taken by its name.
    """

    cfg: Callable[[Any], bool] = lambda pipe: False
    # denoiser -> weak reference to the sample of its last cond call under CFG (consumed by the uncond call)
    _cond_sample: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = field(
        default_factory=weakref.WeakKeyDictionary, compare=False, repr=False)

    def layout(self, pipe, denoiser: nn.Module, arguments: Mapping[str, Any], batch: int,
               context: str | None) -> RowLayout | None:
        if context is not None:
            return None if context == "uncond" else RowLayout(batch, range(batch), None)
        sample = arguments[architecture_of(denoiser).sample_arg]
        if not self.cfg(pipe):
            self._cond_sample.pop(denoiser, None)
            return RowLayout(batch, range(batch), None)
        cond = self._cond_sample.pop(denoiser, None)
        if cond is not None and cond() is sample:
            return None  # the uncond call of the step whose cond call ran on this sample
        self._cond_sample[denoiser] = weakref.ref(sample)
        return RowLayout(batch, range(batch), None)


#: Flux's true-CFG pipelines without cache contexts: CFG is the ``do_true_cfg`` local of their ``__call__``.
SEPARATE_TRUE_CFG = SeparateCalls("separate_calls", {}, cfg=lambda pipe: bool(running_local(pipe, "do_true_cfg", False)))

for _pipeline in ("FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline", "FluxControlNetPipeline"):
    register_pipeline(_pipeline, SEPARATE_TRUE_CFG)
register_pipeline("FluxFillPipeline", "separate")  # no true CFG: one cond call per step
