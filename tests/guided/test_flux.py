"""Integration on pipelines with extra per-row inputs: ControlNet residuals (SD), Flux's separate cond/uncond
calls and rotary embeddings, PixArt's learned sigma and attention masks, DiT's [cond, uncond] rows.

Oracle: the eager implementation (a separate perturbed forward with the maps materialised), and the unpatched
pipeline for scale=0 / after disable.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)

import headpag

# fused vs eager: float32 models with random weights; PixArt's outputs are O(50), hence a relative bound.
RTOL, ATOL = 1e-4, 1e-4


def _vae():
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         scaling_factor=1.5, shift_factor=0.06).eval()


def _run(pipe, kw):
    return torch.as_tensor(pipe(**kw, generator=torch.Generator().manual_seed(0)).images)


def _check(pipe, kw, heads, **settings):
    plain = _run(pipe, kw)
    outputs = {}
    for enable in (headpag.enable_fused, headpag.enable_eager):
        enable(pipe, heads, **settings)
        outputs[enable.__name__] = _run(pipe, kw)
        headpag.disable(pipe)
    torch.testing.assert_close(outputs["enable_fused"], outputs["enable_eager"], rtol=RTOL, atol=ATOL)
    assert (outputs["enable_fused"] - plain).abs().max() > 1e-3, "guidance changed nothing"
    assert torch.equal(_run(pipe, kw), plain), "disable did not restore the pipeline"
    headpag.enable_fused(pipe, heads, **{**settings, "scale": 0.0})
    assert torch.equal(_run(pipe, kw), plain), "scale=0 is not the plain pipeline"
    headpag.disable(pipe)


@pytest.fixture(scope="module")
def controlnet_pipe():
    torch.manual_seed(0)
    common = dict(block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  cross_attention_dim=12, attention_head_dim=2, layers_per_block=2)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **common).eval()
    controlnet = ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(8, 8), **common).eval()
    pipe = StableDiffusionControlNetPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet,
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_controlnet_residuals(controlnet_pipe, guidance_scale):
    torch.manual_seed(1)
    kw = dict(prompt_embeds=torch.randn(2, 5, 12), negative_prompt_embeds=torch.randn(2, 5, 12),
              image=torch.rand(2, 3, 16, 16), num_inference_steps=2, height=16, width=16,
              guidance_scale=guidance_scale, output_type="latent")
    layers = headpag.list_layers(controlnet_pipe)
    mid = next(layer.index for layer in layers if layer.name.startswith("mid_block"))
    # A head before the mid block: the down-block residuals of the ControlNet reach post-fork units.
    _check(controlnet_pipe, kw, f"0:1,{mid}:0@0.5")


@pytest.fixture(scope="module")
def flux_pipe():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("true_cfg_scale", [4.0, 1.0], ids=["true-cfg", "distilled"])
@pytest.mark.parametrize("mode", ["joint", "image"])
def test_flux(flux_pipe, true_cfg_scale, mode):
    torch.manual_seed(1)
    kw = dict(prompt_embeds=torch.randn(2, 6, 32), pooled_prompt_embeds=torch.randn(2, 24),
              negative_prompt_embeds=torch.randn(2, 6, 32), negative_pooled_prompt_embeds=torch.randn(2, 24),
              true_cfg_scale=true_cfg_scale, num_inference_steps=3, height=32, width=32, output_type="latent")
    # layer 0 is the double block, 1 and 2 the single blocks (one index space)
    _check(flux_pipe, kw, "0:1,2:0@0.5", mode=mode)


def test_flux_counts_calls(flux_pipe):
    """With true CFG each step makes two denoiser calls: the cond call carries the twins, the uncond call not."""
    rows = []
    handle = flux_pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    torch.manual_seed(1)
    kw = dict(prompt_embeds=torch.randn(1, 6, 32), pooled_prompt_embeds=torch.randn(1, 24),
              negative_prompt_embeds=torch.randn(1, 6, 32), negative_pooled_prompt_embeds=torch.randn(1, 24),
              true_cfg_scale=4.0, num_inference_steps=2, height=32, width=32, output_type="latent")
    try:
        with headpag.fused(flux_pipe, "0:0"):
            _run(flux_pipe, kw)
    finally:
        handle.remove()
    assert rows == [2, 1, 2, 1]


@pytest.fixture(scope="module")
def pixart_pipe():
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                           caption_channels=12, norm_num_groups=4).eval()
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0], ids=["cfg", "no-cfg"])
def test_pixart(pixart_pipe, guidance_scale):
    torch.manual_seed(1)
    mask = torch.ones(2, 5, dtype=torch.long)
    kw = dict(prompt_embeds=torch.randn(2, 5, 12), prompt_attention_mask=mask, negative_prompt_embeds=torch.randn(2, 5, 12),
              negative_prompt_attention_mask=mask, negative_prompt=None, num_inference_steps=3, height=16, width=16,
              guidance_scale=guidance_scale, output_type="latent", use_resolution_binning=False)
    _check(pixart_pipe, kw, "1:*")


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_dit(guidance_scale):
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, norm_num_groups=4,
                                        num_embeds_ada_norm=1000).eval()
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    _check(pipe, dict(class_labels=[3, 5], num_inference_steps=3, guidance_scale=guidance_scale, output_type="latent"),
           "1:0,0:1@0.5")


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0], ids=["cfg", "no-cfg"])
def test_pixart_joint_mode_matches_apply_layer_skip(pixart_pipe, guidance_scale):
    """mode="joint" on every head of a PixArt layer equals diffusers' own identity attention
    (``apply_layer_skip(skip_attention_scores=True)``) run as the perturbed pass on the cond rows, folded with
    DESIGN.md's formula by a forward hook on the plain pipeline's transformer."""
    import copy

    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    skipping = copy.deepcopy(pixart_pipe.transformer)
    apply_layer_skip(skipping, LayerSkipConfig(indices=[1], fqn="transformer_blocks", skip_attention=False,
                                               skip_attention_scores=True, skip_ff=False))
    cfg = guidance_scale > 1

    def fold(module, args, kwargs, output):
        sample = output[0]
        n = sample.shape[0]
        cond = slice(n // 2, n) if cfg else slice(0, n)
        rows = {k: (v[cond] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v) for k, v in kwargs.items()}
        perturbed = skipping(*[a[cond] for a in args], **rows)[0]
        delta = 3.0 * (sample[cond] - perturbed)
        out = sample.clone()
        out[cond] += delta
        if cfg:
            out[: n // 2] += delta
        return (out, *output[1:])

    torch.manual_seed(1)
    mask = torch.ones(2, 5, dtype=torch.long)
    kw = dict(prompt_embeds=torch.randn(2, 5, 12), prompt_attention_mask=mask, negative_prompt_embeds=torch.randn(2, 5, 12),
              negative_prompt_attention_mask=mask, negative_prompt=None, num_inference_steps=3, height=16, width=16,
              guidance_scale=guidance_scale, output_type="latent", use_resolution_binning=False)
    handle = pixart_pipe.transformer.register_forward_hook(fold, with_kwargs=True)
    try:
        expected = _run(pixart_pipe, kw)
    finally:
        handle.remove()
    for enable in (headpag.enable_fused, headpag.enable_eager):
        enable(pixart_pipe, "1:*", scale=3.0, mode="joint")
        try:
            torch.testing.assert_close(_run(pixart_pipe, kw), expected, rtol=RTOL, atol=ATOL)
        finally:
            headpag.disable(pixart_pipe)
