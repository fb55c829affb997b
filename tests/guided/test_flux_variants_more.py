"""The remaining Flux-family pipelines: FLUX.1 Control (Canny/Depth: control latents as extra input channels) in its
text-to-image, img2img and inpaint forms, FLUX.1 ControlNet img2img and inpaint (per-row residual lists), Kontext
inpaint (the image's tokens after the image tokens, true CFG in an unnamed second call) on FluxTransformer2DModel,
and FLUX.2-klein inpaint (condition-image tokens after the image tokens, true CFG under cache_context("uncond")) on
Flux2Transformer2DModel.

Oracles: the eager implementation (a separate perturbed forward on the cond rows) and the unpatched pipeline
(scale=0, after disable). No diffusers PAG pipeline exists for any of them. For the true-CFG pipelines one step of
the flow-matching Euler loop is linear in the prediction (the inpaint blend too), so the guided-minus-plain output of
a one-step run must not depend on the CFG scale: the uncond call only gets the cond call's delta added; a pattern
that took it for a cond call of its own would add a second delta scaled by 1 - scale."""

from __future__ import annotations

import pytest
import torch

import headpag
from support import models as M
from support import models_flux_family as F
from support import models_flux_more as X
from support.checks import check_fused_eager_restore, effect, guided, recorded_rows
from support.tolerances import MIN_EFFECT, close

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")]  # FluxControlNetModel


def _flux(make, cfg: bool):
    """FLUX.1 inputs: ``prompts`` x ``images_per_prompt`` rows; ``cfg`` None for pipelines without true CFG."""
    def inputs(*, prompts=2, images_per_prompt=1, cfg_on=True, **kw):
        if cfg:
            kw["true_cfg_scale"] = 4.0 if cfg_on else 1.0
        return make(prompts=prompts, images_per_prompt=images_per_prompt, **kw)
    return inputs


def _klein(*, prompts=2, images_per_prompt=1, cfg_on=True, **kw):
    return X.klein_inpaint_inputs(batch=prompts, num_images_per_prompt=images_per_prompt,
                                  cfg=4.0 if cfg_on else 1.0, **kw)


# name -> (pipeline factory, input factory, has true CFG, pattern name)
VARIANTS = {
    "control": (X.flux_control, _flux(X.flux_control_inputs, False), False, "separate"),
    "control-img2img": (X.flux_control_img2img, _flux(X.flux_control_img2img_inputs, False), False, "separate"),
    "control-inpaint": (X.flux_control_inpaint, _flux(X.flux_control_inpaint_inputs, False), False, "separate"),
    "controlnet-img2img": (X.flux_controlnet_img2img, _flux(X.flux_controlnet_img2img_inputs, False), False,
                           "separate"),
    "controlnet-inpaint": (X.flux_controlnet_inpaint, _flux(X.flux_controlnet_inpaint_inputs, False), False,
                           "separate"),
    "kontext-inpaint": (X.flux_kontext_inpaint, _flux(X.flux_kontext_inpaint_inputs, True), True, "separate_calls"),
    "klein-inpaint": (X.klein_inpaint, _klein, True, "separate"),
}
CLASSES = {
    "control": "FluxControlPipeline", "control-img2img": "FluxControlImg2ImgPipeline",
    "control-inpaint": "FluxControlInpaintPipeline", "controlnet-img2img": "FluxControlNetImg2ImgPipeline",
    "controlnet-inpaint": "FluxControlNetInpaintPipeline", "kontext-inpaint": "FluxKontextInpaintPipeline",
    "klein-inpaint": "Flux2KleinInpaintPipeline",
}
TRUE_CFG = [name for name, v in VARIANTS.items() if v[2]]
HEADS = "0:1,2:0@0.5"  # layer 0 is the double block, 1 and 2 the single blocks (one index space)
_PIPES: dict = {}


def pipe_of(name: str):
    if name not in _PIPES:
        _PIPES[name] = VARIANTS[name][0]()
    return _PIPES[name]


def inputs_of(name: str, **kw) -> dict:
    return VARIANTS[name][1](**kw)


def full_steps(name: str, steps: int) -> dict:
    """``steps`` denoising steps: strength 1 where the pipeline starts from an image (it skips 1 - strength)."""
    return dict(steps=steps) if name == "control" else dict(steps=steps, strength=1.0)


def test_layers_and_patterns():
    """Every variant's denoiser is its transformer (a ControlNet model is no layer source): one index space over the
    double then the single blocks, 2 heads of 16; each pipeline has its call pattern, CFG off as documented."""
    expected = [("transformer_blocks.0.attn", "transformer_blocks.0"),
                ("single_transformer_blocks.0.attn", "single_transformer_blocks.0"),
                ("single_transformer_blocks.1.attn", "single_transformer_blocks.1")]
    for name, (_, _, _, pattern_name) in VARIANTS.items():
        pipe = pipe_of(name)
        assert type(pipe).__name__ == CLASSES[name]
        assert headpag.get_denoiser(pipe) is pipe.transformer
        layers = headpag.list_layers(pipe)
        assert [(x.name, x.fork_unit) for x in layers] == expected, name
        assert [(x.index, x.heads, x.head_dim, x.kind) for x in layers] == [(i, 2, 16, "joint") for i in range(3)]
        pattern = headpag.archs.call_pattern_of(pipe)
        assert pattern.name == pattern_name, name
        assert pattern.cfg_off == ({"guidance_scale": 1.0} if name == "klein-inpaint" else {}), name
    assert headpag.archs.call_pattern_of(pipe_of("kontext-inpaint")) is headpag.archs.flux.SEPARATE_TRUE_CFG


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("name, cfg", [pytest.param(name, True, id=name + ("-true-cfg" if name in TRUE_CFG else ""))
                                       for name in VARIANTS] +
                         [pytest.param(name, False, id=f"{name}-no-cfg") for name in TRUE_CFG])
def test_fused_eager_restore(name, cfg, mode):
    check_fused_eager_restore(pipe_of(name), inputs_of(name, cfg_on=cfg), HEADS, mode=mode)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_prompts_two_images(name):
    check_fused_eager_restore(pipe_of(name), inputs_of(name, prompts=2, images_per_prompt=2), HEADS, mode="image")


@pytest.mark.parametrize("name", TRUE_CFG)
def test_uncond_call_gets_the_cond_delta(name):
    """One step (strength 1): guided - plain is the same with true CFG on (scale 4) and off."""
    pipe = pipe_of(name)
    shifts = {}
    for cfg in (True, False):
        inputs = inputs_of(name, cfg_on=cfg, **full_steps(name, 1))
        shifts[cfg] = guided(pipe, "fused", HEADS, inputs) - M.run(pipe, inputs)
    assert effect(shifts[False], torch.zeros_like(shifts[False])) > MIN_EFFECT
    close(shifts[True], shifts[False], "families")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_counts_calls(name):
    """Each step's cond call carries the twins; with true CFG an uncond call follows without them."""
    pipe = pipe_of(name)
    with recorded_rows({"block0": pipe.transformer.transformer_blocks[0]}) as log:
        with headpag.fused(pipe, "0:0"):
            M.run(pipe, inputs_of(name, prompts=1, **full_steps(name, 2)))
    assert log["block0"] == ([2, 1, 2, 1] if VARIANTS[name][2] else [2, 2])


@pytest.mark.parametrize("name", ["control", "control-img2img", "control-inpaint"])
def test_control_channels_are_per_row(name):
    """Control's 32 input channels (latents, then the control image's latents) are one per-row tensor: the twins get
    them, and the control image matters."""
    pipe = pipe_of(name)
    shapes = []
    handle = pipe.transformer.x_embedder.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        with headpag.fused(pipe, "1:0"):
            M.run(pipe, inputs_of(name, prompts=1, **full_steps(name, 1)))
    finally:
        handle.remove()
    assert shapes == [(2, (F.SIZE // 4) ** 2, 32)]
    inputs = inputs_of(name, prompts=1)
    other = inputs | {"control_image": F.images(1, seed=99)}
    assert effect(M.run(pipe, inputs), M.run(pipe, other)) > MIN_EFFECT


@pytest.mark.parametrize("heads", ["2:*", "0:0"], ids=["fork-at-single-block", "fork-at-double-block"])
@pytest.mark.parametrize("name", ["controlnet-img2img", "controlnet-inpaint"])
def test_controlnet_residuals(name, heads):
    """The ControlNet residual lists are per-row arguments: they get the twins at entry, and are added to the
    blocks' outputs whether the twins forked before or after them."""
    pipe = pipe_of(name)
    inputs = inputs_of(name)
    assert effect(M.run(pipe, inputs), M.run(pipe, inputs | {"controlnet_conditioning_scale": 0.0})) > MIN_EFFECT
    check_fused_eager_restore(pipe, inputs, heads)


@pytest.mark.parametrize("reference", [False, True], ids=["image-tokens", "reference-tokens"])
def test_kontext_inpaint_token_layout(reference):
    """Kontext inpaint appends the image's (or the reference image's) 16 tokens to the 16 image tokens; the text
    tokens stay first: mode="image" gets n_text = the prompt length, checked on the double block's text values."""
    pipe = pipe_of("kontext-inpaint")
    tokens = (F.SIZE // 4) ** 2
    handle, text = F.text_values(pipe.transformer.transformer_blocks[0].attn)
    try:
        with F.routed_calls() as calls, recorded_rows({"x_embedder": pipe.transformer.x_embedder}) as log:
            with headpag.fused(pipe, "0:0,2:1", mode="image"):
                out = M.run(pipe, inputs_of("kontext-inpaint", reference=reference, prompts=1, steps=1))
    finally:
        handle.remove()
    assert out.shape[1] == tokens
    assert log["x_embedder"] == [2, 1]  # the cond call with its twin, the uncond call
    assert [c["layer"] for c in calls] == ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    for c in calls:
        assert (c["n_text"], c["text_first"], c["v"].shape[1]) == (F.TEXT_LEN, True, F.TEXT_LEN + 2 * tokens)
    assert torch.equal(calls[0]["v"][:, :F.TEXT_LEN], text[0])


def test_klein_inpaint_condition_tokens():
    """Klein inpaint's hidden_states are the 4 image tokens then the 4 condition-image tokens (one per-row tensor);
    text first, so mode="image" gets n_text = the prompt length."""
    from support import models_flux2 as F2

    pipe = pipe_of("klein-inpaint")
    with F.routed_calls() as calls:
        with headpag.fused(pipe, "1:0", mode="image"):
            M.run(pipe, inputs_of("klein-inpaint", prompts=1, steps=1))
    assert [(c["layer"], c["n_text"], c["text_first"], tuple(c["v"].shape[:2])) for c in calls] == [
        ("single_transformer_blocks.0.attn", F2.TEXT_LEN, True, (2, F2.TEXT_LEN + 8))]
