"""LTX-2 / LTX-2.3 joint audio-video generation: ``LTX2VideoTransformer3DModel``.

- The model denoises a video and an audio latent together: every ``LTX2VideoTransformerBlock`` carries both streams
  and runs, in order, video self-attention ``attn1``, audio self-attention ``audio_attn1``, video-text and audio-text
  cross-attention (``attn2``, ``audio_attn2``), audio-to-video and video-to-audio cross-attention
  (``audio_to_video_attn``: video queries, audio keys; ``video_to_audio_attn``: the reverse), then the two
  feed-forwards. It returns ``(video, audio)`` predictions (``AudioVisualModelOutput(sample, audio_sample)``).
- Layer ``i`` is ``transformer_blocks[i].attn1``, the video self-attention over the video tokens (latent frames x
  spatial patches, frame-major; no text tokens, no audio tokens). Fork unit: ``transformer_blocks[i]``. Not layers:
  the audio self-attention (its heads shape the audio, not the video, and LTX-2's own perturbation, STG, treats it as
  a separate stream with its own scale), the text cross-attentions and the audio-video cross-attentions (their maps
  are between two different token sets: the identity is not defined there). No joint attention: ``mode="joint"`` and
  ``"image"`` both mean the identity over the video tokens.
- The audio stream is per-row state: the twins carry their own audio tokens from the fork on (the audio of a twin
  changes through ``video_to_audio_attn`` once its video has been perturbed, and feeds back into its video through
  ``audio_to_video_attn`` in later blocks, as in any perturbed forward of this model). What is guided is the *video*
  prediction: ``delta = w * (video_cond - video_perturbed)`` is folded into the video output; the audio prediction
  of the pipeline's rows is returned as the unperturbed model computes it, so the pipeline's own audio CFG, STG and
  modality guidance apply unchanged. (Guiding the audio prediction as well, as LTX-2's STG does with its
  ``audio_stg_scale``, would need the fold to know a second output.)
- Processors: ``LTX2AudioVideoAttnProcessor`` (LTX-2.0) and ``LTX2PerturbedAttnProcessor`` (LTX-2.3, ``perturbed_attn``
  configs, used by the pipelines' STG pass): each makes one ``dispatch_attention_fn`` call in ``(B, N, H, D)``; RoPE
  (interleaved or split) and the per-head output gates of LTX-2.3's ``gated_attn`` stay diffusers' code around it. The
  perturbed processor skips attention altogether in an STG block of the STG pass (``all_perturbed``); that pass is a
  side pass here (never forked), and a forked call that asks for STG on a selected layer raises (no attention ran).
- Per row (denoiser): ``hidden_states`` (packed video latents ``(B, N, C)``), ``audio_hidden_states``, both text
  embeddings and their masks (``encoder_attention_mask`` ``(B, T)``, turned into an additive ``(B, 1, T)`` bias),
  ``timestep`` (``(B,)``, or ``(B, N)`` per token in image-to-video), ``audio_timestep``, ``sigma`` / ``audio_sigma``
  (LTX-2.3's prompt modulation), ``video_coords`` / ``audio_coords`` (RoPE positions ``(B, 3, N, 2)`` /
  ``(B, 1, N_audio, 2)``: the RoPE tables are per row), ``perturbation_mask``, ``video_self_attention_mask`` (IC-LoRA's
  ``(B, N, N)`` mask on the video self-attention: the layer's own mask, taken as SDPA takes it) and
  ``video_keyframes_mask``. Inside the blocks: both streams, the modulations (``temb``, ``temb_audio``, the four
  audio-video cross-attention ones, ``temb_prompt`` / ``temb_prompt_audio``), the six RoPE tables and the masks.
- Timesteps: the pipelines pass the scheduler's timestep as it is (``sigma * 1000``); image-to-video passes one per
  video token with 0 on the conditioning frame's tokens (the first ones), so the scheduler timestep is the row's
  maximum.
- Pipelines (``LTX2Pipeline``, ``LTX2ImageToVideoPipeline``): per step one call with the rows ``[uncond, cond]`` (CFG:
  ``guidance_scale > 1`` or ``audio_guidance_scale > 1``) or ``[cond]`` under ``cache_context("cond_uncond")``; then,
  with STG (``stg_scale > 0``, on by default), a call on the cond rows under ``cache_context("uncond_stg")`` and, with
  modality guidance (``modality_scale > 1``, on by default), one under ``cache_context("uncond_modality")`` with the
  audio-video cross-attention off. The first call carries the twins; the STG and modality calls are side passes that
  get the step's delta added, so the pipeline's ``stg_scale * (cond - stg)`` and ``(modality_scale - 1) * (cond -
  modality)`` terms stay what they are unguided. The pipeline combines the terms on ``x0 = latents - sigma * v``, an
  affine map of the velocity shared by all rows, so the folded delta comes out as ``w * (cond - perturbed)`` in
  velocity and in ``x0`` alike.
- Refused: ``guidance_rescale > 0`` on the video (the pipelines' default is 0.7: pass ``guidance_rescale=0``). The
  pipeline rescales the guided ``x0`` to the standard deviation of the cond ``x0``, which the fold has moved; its
  ``rescale_noise_cfg`` call gets that ``x0`` (converted from the moved velocity), which headpag's rescale wrapper
  (``guided/rescale.py``) cannot recognise to swap in the unmoved cond rows. ``audio_guidance_rescale`` is exact (the
  audio prediction is not moved).
- Outputs: the transformer returns ``(video, audio)``; a fused call's fold narrows both to the pipeline's rows
  (``guided/rows.replace_sample`` narrows every per-row output), the delta added to the video only.
- Real checkpoints (diffusers' ``scripts/convert_ltx2_to_diffusers.py``, versions "2.0" and "2.3"; the class defaults
  are LTX-2.0's): LTX-2 (19B) and LTX-2.3 48 layers x 32 heads of 128 (audio stream 32 heads of 64, not layers).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import LTX2VideoTransformer3DModel
from torch import nn

from .pipelines import CallPattern, RowLayout, register_pipeline
from .registry import Architecture, block_list, register_architecture

def _scheduler_timestep(timestep):
    """Per-token timesteps ``(B, N)`` (image-to-video: 0 on the conditioning frame's tokens) back to each row's
    scheduler timestep, the largest entry; ``(B,)`` passes as it is."""
    if isinstance(timestep, torch.Tensor) and timestep.dim() >= 2:
        return timestep.flatten(1).amax(dim=1)
    return timestep


LTX2 = register_architecture(Architecture(
    LTX2VideoTransformer3DModel, "self", *block_list("transformer_blocks", attention="attn1"),
    row_args=("hidden_states", "audio_hidden_states", "encoder_hidden_states", "audio_encoder_hidden_states",
              "timestep", "audio_timestep", "sigma", "audio_sigma", "encoder_attention_mask",
              "audio_encoder_attention_mask", "video_coords", "audio_coords", "perturbation_mask", "attention_kwargs",
              "video_self_attention_mask", "video_keyframes_mask"),
    unit_row_args={"LTX2VideoTransformerBlock": (
        "hidden_states", "audio_hidden_states", "encoder_hidden_states", "audio_encoder_hidden_states", "temb",
        "temb_audio", "temb_ca_scale_shift", "temb_ca_audio_scale_shift", "temb_ca_gate", "temb_ca_audio_gate",
        "temb_prompt", "temb_prompt_audio", "video_rotary_emb", "audio_rotary_emb", "ca_video_rotary_emb",
        "ca_audio_rotary_emb", "encoder_attention_mask", "audio_encoder_attention_mask", "self_attention_mask",
        "audio_self_attention_mask", "a2v_cross_attention_mask", "v2a_cross_attention_mask", "perturbation_mask",
    )},
    processors=("LTX2AudioVideoAttnProcessor", "LTX2PerturbedAttnProcessor"),
    scheduler_timestep=_scheduler_timestep,
))

#: The cache contexts of the pipelines' side passes: STG and modality-isolation guidance, on the cond rows.
SIDE_PASSES = ("uncond_stg", "uncond_modality")
MAIN_CALL = "cond_uncond"


class LTX2Calls(CallPattern):
    """LTX-2's loop (module docstring): the main call ``[uncond, cond]`` (CFG) or ``[cond]`` under
    ``cache_context("cond_uncond")``, then the STG and modality side passes on the cond rows, shifted by the step's
    delta. A call that isolates the modalities or asks for STG is a side pass whatever its context."""

    def layout(self, pipe, denoiser: nn.Module, arguments: Mapping[str, Any], batch: int,
               context: str | None) -> RowLayout | None:
        if context in SIDE_PASSES or arguments.get("isolate_modalities") or arguments.get(
                "spatio_temporal_guidance_blocks"):
            return None
        if context not in (None, MAIN_CALL):
            raise ValueError(f"{type(pipe).__name__} called the LTX-2 transformer under cache_context({context!r}): "
                             f"headpag knows the LTX-2 loop's {(MAIN_CALL, *SIDE_PASSES)} calls only")
        rescale = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)
        if rescale > 0:
            raise ValueError(
                f"guidance_rescale={rescale} is not supported with headpag on {type(pipe).__name__}: the pipeline "
                f"rescales the guided video x0 to the cond x0, which headpag's fold has moved, and headpag cannot hand "
                f"it the unmoved one; call the pipeline with guidance_rescale=0 (audio_guidance_rescale is exact)"
            )
        if pipe.do_classifier_free_guidance:
            return RowLayout(batch, range(batch // 2, batch), range(0, batch // 2))
        return RowLayout(batch, range(batch), None)


#: CFG is off when neither modality's scale is above 1 (``audio_guidance_scale`` defaults to 7, not to
#: ``guidance_scale``).
LTX2_CALLS = LTX2Calls("ltx2_cond_uncond", {"guidance_scale": 1.0, "audio_guidance_scale": 1.0})

for _pipeline in ("LTX2Pipeline", "LTX2ImageToVideoPipeline"):
    register_pipeline(_pipeline, LTX2_CALLS)
