"""Tiny LTX-2 pipelines (``LTX2Pipeline``, ``LTX2ImageToVideoPipeline``) built from configs (random, seeded weights; no
hub), and their run helpers.

- :func:`ltx2_transformer`: 2 ``LTX2VideoTransformerBlock`` with a video stream of 2 heads of dim 8 and an audio stream
  of 2 heads of dim 4 (diffusers' own test sizes), 16-dim text; ``ltx23=True`` makes LTX-2.3's layout (per-head output
  gates, prompt modulation by sigma, ``LTX2PerturbedAttnProcessor``, no caption projection) in small.
- :func:`ltx2_vae`: an ``AutoencoderKLLTX2Video`` with the real checkpoint's four down blocks and 4x4 patches, so it
  compresses 32x in space and 8x in time (9 frames of 64x64 are 2 latent frames of 2x2: 8 video tokens per row), with
  4 latent channels of 8-channel blocks.
- :func:`ltx2_audio_vae`: diffusers' tiny ``AutoencoderKLLTX2Audio`` (2 latent channels, 8 mel bins -> 2): 9 frames at
  25 fps are 9 audio latent frames of 4 channels.
- :func:`ltx2` / :func:`ltx2_i2v`: the pipelines, text encoder, tokenizer and vocoder ``None`` (prompt embeddings are
  passed directly, with their masks; ``output_type="latent"`` decodes nothing).

Prompt embeddings are the packed Gemma hidden states the pipeline's connectors take: ``(B, T, 16 * 2)`` (16 channels
x 2 "layers"), with a left-padded attention mask (the Gemma tokenizer pads left). The pipelines repeat given
embeddings neither for ``num_videos_per_prompt`` nor otherwise, so ``batch`` prompts with ``videos_per_prompt`` videos
each are passed as ``batch * videos_per_prompt`` rows, each prompt's repeated consecutively.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    FlowMatchEulerDiscreteScheduler,
    LTX2ImageToVideoPipeline,
    LTX2Pipeline,
    LTX2VideoTransformer3DModel,
)
from diffusers.pipelines.ltx2 import LTX2TextConnectors


HEADS = 2
HEAD_DIM = 8
AUDIO_HEADS = 2
AUDIO_HEAD_DIM = 4
LAYERS = 2
CAPTION = 16  # caption channels = the connectors' width (2 heads x 8)
TEXT_LAYERS = 2  # "hidden states" packed per token: (B, T, CAPTION * TEXT_LAYERS)
TEXT_LEN = 6
FRAMES = 9  # -> 2 latent frames
SIZE = 64  # pixels -> 2x2 latents
VIDEO_TOKENS = 2 * 2 * 2
AUDIO_TOKENS = 9


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- models -------------------------------------------------------------------------------------------------------


def ltx2_transformer(*, num_layers: int = LAYERS, heads: int = HEADS, head_dim: int = HEAD_DIM, ltx23: bool = False,
                     **overrides) -> LTX2VideoTransformer3DModel:
    """``num_layers`` blocks, the video stream ``heads`` x ``head_dim``, the audio stream 2 x 4. ``ltx23``: LTX-2.3's
    options (``gated_attn``, ``cross_attn_mod`` on both streams, ``perturbed_attn``, text embeddings already at the
    streams' widths, so no caption projection)."""
    inner = heads * head_dim
    audio_inner = AUDIO_HEADS * AUDIO_HEAD_DIM
    config = dict(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=heads,
        attention_head_dim=head_dim, cross_attention_dim=inner, audio_in_channels=4, audio_out_channels=4,
        audio_num_attention_heads=AUDIO_HEADS, audio_attention_head_dim=AUDIO_HEAD_DIM,
        audio_cross_attention_dim=audio_inner, num_layers=num_layers, caption_channels=CAPTION,
        rope_double_precision=False, rope_type="split",
    )
    if ltx23:
        config |= dict(gated_attn=True, cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True,
                       perturbed_attn=True, use_prompt_embeddings=False)
    return LTX2VideoTransformer3DModel(**config | overrides).eval()


def connectors(*, ltx23: bool = False, video_dim: int = HEADS * HEAD_DIM) -> LTX2TextConnectors:
    """One connector layer per stream, 2 heads each. LTX-2.0: both connectors at the caption width (the transformer
    projects the captions to its streams); LTX-2.3: per-modality projections to the streams' widths (``video_dim``,
    the audio stream's), each connector that wide."""
    widths = (video_dim, AUDIO_HEADS * AUDIO_HEAD_DIM) if ltx23 else (CAPTION, CAPTION)
    extra = dict(per_modality_projections=True, video_hidden_dim=widths[0], audio_hidden_dim=widths[1]) if ltx23 else {}
    return LTX2TextConnectors(
        caption_channels=CAPTION, text_proj_in_factor=TEXT_LAYERS, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=widths[0] // 2, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=widths[1] // 2, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_double_precision=False,
        rope_type="split", **extra,
    ).eval()


def ltx2_vae() -> AutoencoderKLLTX2Video:
    """The LTX-2 VAE's layout (4 down blocks: spatial, temporal, spatio-temporal x 2; 4x4 patches) with 8-channel
    blocks and 4 latent channels: 32x in space, 8x in time, as the real one."""
    return AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("LTX2VideoDownBlock3D",) * 4, decoder_block_out_channels=(8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False,) * 4, downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=False, patch_size=4,
        patch_size_t=1, encoder_causal=True, decoder_causal=False, spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    ).eval()


def ltx2_audio_vae() -> AutoencoderKLLTX2Audio:
    return AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ).eval()


def _components(seed: int, ltx23: bool, transformer: dict) -> dict:
    torch.manual_seed(seed)
    model = ltx2_transformer(ltx23=ltx23, **transformer)
    video_dim = model.config.num_attention_heads * model.config.attention_head_dim
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=ltx2_vae(), audio_vae=ltx2_audio_vae(),
                text_encoder=None, tokenizer=None, connectors=connectors(ltx23=ltx23, video_dim=video_dim),
                transformer=model, vocoder=None)


def ltx2(*, seed: int = 0, ltx23: bool = False, **transformer) -> LTX2Pipeline:
    """Text-to-video (and audio)."""
    return _quiet(LTX2Pipeline(**_components(seed, ltx23, transformer)))


def ltx2_i2v(*, seed: int = 0, ltx23: bool = False, **transformer) -> LTX2ImageToVideoPipeline:
    """Image-to-video: the image is encoded as the first latent frame, whose tokens get timestep 0."""
    return _quiet(LTX2ImageToVideoPipeline(**_components(seed, ltx23, transformer)))


# --- inputs ---------------------------------------------------------------------------------------------------------


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text_mask(rows: int, lengths: list[int] | None = None, text_len: int = TEXT_LEN) -> torch.Tensor:
    """A left-padded mask: row ``i`` has its last ``lengths[i % len]`` tokens (all by default)."""
    mask = torch.zeros(rows, text_len, dtype=torch.long)
    for i in range(rows):
        n = text_len if lengths is None else lengths[i % len(lengths)]
        mask[i, text_len - n:] = 1
    return mask


def ltx2_inputs(*, batch: int = 1, videos_per_prompt: int = 1, cfg: float = 4.0, audio_cfg: float | None = None,
                steps: int = 2, seed: int = 1, stg: float = 0.0, modality: float = 1.0,
                lengths: list[int] | None = None, **extra) -> dict:
    """One call: ``batch`` prompts x ``videos_per_prompt`` videos of :data:`FRAMES` frames of :data:`SIZE` pixels,
    latent output; negative embeddings when CFG is on (``cfg`` or ``audio_cfg`` above 1; ``audio_cfg`` defaults to
    ``cfg``). ``lengths``: the prompts' token counts (left padding), per row cyclically. ``stg`` / ``modality``: the
    pipeline's STG scale (on layer 1) and modality-guidance scale; ``guidance_rescale`` 0 (headpag refuses it)."""
    audio_cfg = cfg if audio_cfg is None else audio_cfg
    rows = batch * videos_per_prompt

    def emb(s):
        return _embeds(s, batch, TEXT_LEN, CAPTION * TEXT_LAYERS).repeat_interleave(videos_per_prompt, dim=0)

    kw = dict(prompt_embeds=emb(seed), prompt_attention_mask=text_mask(rows, lengths), num_inference_steps=steps,
              height=SIZE, width=SIZE, num_frames=FRAMES, frame_rate=25.0, guidance_scale=cfg,
              audio_guidance_scale=audio_cfg, stg_scale=stg, audio_stg_scale=stg, modality_scale=modality,
              audio_modality_scale=modality, guidance_rescale=0.0, audio_guidance_rescale=0.0,
              spatio_temporal_guidance_blocks=[LAYERS - 1] if stg > 0 else None, output_type="latent")
    if cfg > 1 or audio_cfg > 1:
        kw |= dict(negative_prompt_embeds=emb(seed + 1), negative_prompt_attention_mask=text_mask(rows, lengths))
    return kw | extra


def image(seed: int = 2) -> PIL.Image.Image:
    """A random RGB image of :data:`SIZE` pixels."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def ltx2_i2v_inputs(**kwargs) -> dict:
    """:func:`ltx2_inputs` plus the conditioning image (no re-compression: ``image_crf=0``)."""
    return ltx2_inputs(**kwargs) | dict(image=image(), image_crf=0)


# --- running ----------------------------------------------------------------------------------------------------------


def run_both(pipe, inputs: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``pipe(**inputs)`` with a freshly seeded generator: the latent video ``(B, C, F, H, W)`` and audio."""
    with torch.no_grad():
        out = pipe(**inputs, generator=torch.Generator().manual_seed(seed))
    return out.frames, out.audio


def run(pipe, inputs: dict, seed: int = 0) -> torch.Tensor:
    """The latent video and the latent audio of ``pipe(**inputs)``, flattened per row and concatenated
    ``(B, video + audio)``: one tensor for the shared checks, which compare both."""
    video, audio = run_both(pipe, inputs, seed)
    return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)


def split(out: torch.Tensor, pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`run`'s output back into ``(video, audio)`` (flattened per row)."""
    n_video = 4 * VIDEO_TOKENS
    return out[:, :n_video], out[:, n_video:]


def guided(pipe, execution: str, heads, inputs: dict, **settings) -> torch.Tensor:
    """:func:`support.checks.guided` with this family's :func:`run`."""
    from .checks import guided as guided_run

    return guided_run(pipe, execution, heads, inputs, run=run, **settings)


# --- the fold change fused execution needs (proposed for headpag/guided/rows.py) ------------------------------------
