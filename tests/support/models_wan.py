"""Tiny Wan pipelines (``WanPipeline``, ``WanImageToVideoPipeline``) built from configs, and their run / check
helpers (random, seeded weights; no hub).

- :func:`wan_transformer`: 2 ``WanTransformerBlock`` of 2 heads of dim 12, patch ``(1, 2, 2)``, 16-dim text.
- :func:`wan_vae`: an ``AutoencoderKLWan`` of 4 latent channels that downsamples 4x in time and space (so 5 frames
  of 16x16 are 2 latent frames of 4x4: 2 x 2 x 2 = 8 video tokens per row).
- :func:`wan` (text-to-video): UniPC with flow sigmas, Wan's shipped scheduler. ``transformer_2=True`` with a
  ``boundary_ratio`` makes Wan 2.2 A14B's two-stage layout; ``expand_timesteps=True`` Wan 2.2 TI2V's per-token
  timesteps.
- :func:`wan_i2v` (image-to-video): Wan 2.1 I2V (a tiny CLIP vision encoder, ``image_dim`` set, the transformer's
  input is latents + mask + encoded first frame, 12 channels) or, with ``expand_timesteps=True``, Wan 2.2 TI2V
  (no image encoder; the first latent frame is the encoded image and its tokens get timestep 0).

Text encoders are ``None``: prompt embeddings are passed directly. The pipelines repeat given embeddings neither
for ``num_videos_per_prompt`` nor for the image rows, so ``batch`` prompts with ``videos_per_prompt`` videos each
are passed as ``batch * videos_per_prompt`` embedding rows, each prompt's repeated consecutively (the rows
``encode_prompt`` would make). Wan 2.1 I2V's cross-attention takes the last 512 tokens of its context as text
(hardcoded in ``WanAttnProcessor``), so its prompt embeddings are 512 tokens long.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPVisionConfig, CLIPVisionModel

try:  # transformers >= 5 without torchvision: the PIL backend, named (the generic name warns and falls back to it)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor


from .tolerances import MIN_EFFECT, close

HEADS = 2
HEAD_DIM = 12
LAYERS = 2
Z_DIM = 4  # latent channels
TEXT_DIM = 16
TEXT_LEN = 6  # prompt tokens (text-to-video, Wan 2.2 TI2V)
I2V_TEXT_LEN = 512  # Wan 2.1 I2V: WanAttnProcessor splits its context at 512 text tokens
CLIP_DIM = 24  # hidden size of the tiny CLIP vision encoder = the transformer's image_dim
FRAMES = 5  # -> 2 latent frames
SIZE = 16  # pixels -> 4x4 latents -> 2x2 patches


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- models -------------------------------------------------------------------------------------------------------


def wan_transformer(*, in_channels: int = Z_DIM, image_dim: int | None = None, num_layers: int = LAYERS,
                    heads: int = HEADS, head_dim: int = HEAD_DIM) -> WanTransformer3DModel:
    """``num_layers`` blocks of ``heads`` heads of dim ``head_dim``; ``image_dim`` adds Wan 2.1 I2V's image
    embedder and the added K/V of every ``attn2``."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=image_dim,
        added_kv_proj_dim=heads * head_dim if image_dim is not None else None, rope_max_seq_len=32,
    ).eval()


def wan_vae() -> AutoencoderKLWan:
    """Two 4x4x4 down levels (time and space), :data:`Z_DIM` latent channels, unit latent statistics."""
    return AutoencoderKLWan(
        base_dim=4, z_dim=Z_DIM, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
        latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM, scale_factor_temporal=4, scale_factor_spatial=4,
    ).eval()


def unipc() -> UniPCMultistepScheduler:
    """The scheduler the Wan checkpoints ship: UniPC over flow sigmas."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                   num_train_timesteps=1000)


def clip_vision() -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    """A tiny random CLIP vision encoder (32x32 input, 8x8 patches: 17 tokens of width :data:`CLIP_DIM`)."""
    config = CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(config).eval(), processor


# --- pipelines ------------------------------------------------------------------------------------------------------


def wan(*, seed: int = 0, transformer_2: bool = False, boundary_ratio: float | None = None,
        expand_timesteps: bool = False, scheduler=None) -> WanPipeline:
    """Text-to-video. ``transformer_2``: a second (low-noise) transformer, used below ``boundary_ratio``."""
    torch.manual_seed(seed)
    transformer = wan_transformer()
    second = wan_transformer() if transformer_2 else None
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=wan_vae(), scheduler=scheduler or unipc(),
                       transformer=transformer, transformer_2=second, boundary_ratio=boundary_ratio,
                       expand_timesteps=expand_timesteps)
    return _quiet(pipe)


def wan_i2v(*, seed: int = 0, expand_timesteps: bool = False) -> WanImageToVideoPipeline:
    """Image-to-video: Wan 2.1 I2V (CLIP image tokens, latents + mask + condition channels) or, with
    ``expand_timesteps``, Wan 2.2 TI2V (the first latent frame replaced by the image's, per-token timesteps)."""
    torch.manual_seed(seed)
    if expand_timesteps:
        transformer, image_encoder, image_processor = wan_transformer(), None, None
    else:
        # noise latents, 4 mask channels (one per frame of a temporal group), the encoded conditioning video
        transformer = wan_transformer(in_channels=2 * Z_DIM + 4, image_dim=CLIP_DIM)
        image_encoder, image_processor = clip_vision()
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=wan_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=image_processor, image_encoder=image_encoder, transformer=transformer,
        expand_timesteps=expand_timesteps,
    )
    return _quiet(pipe)


def wan_inputs(*, batch: int = 1, videos_per_prompt: int = 1, cfg: float = 5.0, steps: int = 2, seed: int = 1,
               text_len: int = TEXT_LEN, **extra) -> dict:
    """One call: ``batch`` prompts x ``videos_per_prompt`` videos of :data:`FRAMES` frames of :data:`SIZE`
    pixels, latent output; negative embeddings when ``cfg > 1``."""
    def emb(s):
        return _embeds(s, batch, text_len, TEXT_DIM).repeat_interleave(videos_per_prompt, dim=0)

    kw = dict(prompt_embeds=emb(seed), num_inference_steps=steps, height=SIZE, width=SIZE, num_frames=FRAMES,
              guidance_scale=cfg, output_type="latent")
    if cfg > 1:
        kw["negative_prompt_embeds"] = emb(seed + 1)
    return kw | extra


def image(seed: int = 2) -> PIL.Image.Image:
    """A random RGB image of :data:`SIZE` pixels."""
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def wan_i2v_inputs(pipe: WanImageToVideoPipeline, **kwargs) -> dict:
    """:func:`wan_inputs` plus the conditioning image; 512-token prompts for Wan 2.1 I2V."""
    text_len = I2V_TEXT_LEN if pipe.transformer.config.image_dim is not None else TEXT_LEN
    return wan_inputs(text_len=text_len, **kwargs) | dict(image=image())


# --- running and checks --------------------------------------------------------------------------------------------


def run(pipe, inputs: dict, seed: int = 0) -> torch.Tensor:
    """``pipe(**inputs)`` with a freshly seeded generator: the latent video ``(B, C, F, H, W)``."""
    with torch.no_grad():
        return pipe(**inputs, generator=torch.Generator().manual_seed(seed)).frames


def guided(pipe, execution: str, heads, inputs: dict, **settings) -> torch.Tensor:
    """:func:`support.checks.guided` with this family's :func:`run`."""
    from .checks import guided as guided_run

    return guided_run(pipe, execution, heads, inputs, run=run, **settings)


def effect(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def check_fused_eager_restore(pipe, inputs: dict, heads, **settings) -> tuple[float, float]:
    """``support.checks.check_fused_eager_restore`` for Wan's ``.frames`` output: fused == eager
    (``TOL["families"]``), guidance changes the output by more than ``MIN_EFFECT``, disable restores the plain
    pipeline bit for bit and ``scale=0`` is the plain pipeline. Returns ``(max |fused - eager|, effect)``."""
    plain = run(pipe, inputs)
    fused, eager = (guided(pipe, execution, heads, inputs, **settings) for execution in ("fused", "eager"))
    close(fused, eager, "families")
    assert effect(fused, plain) > MIN_EFFECT, "guidance changed nothing"
    assert torch.equal(run(pipe, inputs), plain), "disable did not restore the pipeline"
    assert torch.equal(guided(pipe, "fused", heads, inputs, **{**settings, "scale": 0.0}), plain), \
        "scale=0 is not the plain pipeline"
    return effect(fused, eager), effect(fused, plain)
