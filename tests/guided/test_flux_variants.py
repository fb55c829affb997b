"""The Flux pipelines beyond FluxPipeline: img2img, inpaint, Fill (extra input channels), Kontext (reference-image
tokens after the image tokens) and ControlNet (per-row residual lists), all on FluxTransformer2DModel.

Oracles: the eager implementation (a separate perturbed forward on the cond rows) and the unpatched pipeline
(scale=0, after disable). Their true-CFG loops make an uncond call per step that no cache_context names: one step
of a flow-matching Euler pipeline is linear in the prediction, so the guided-minus-plain output of a one-step run
must not depend on the true-CFG scale (the uncond call only gets the cond call's delta added; a guided uncond
call would add a delta of its own, scaled by 1 - true_cfg_scale)."""

from __future__ import annotations

import pytest
import torch

import headpag
from support import models as M
from support import models_flux_family as F
from support.checks import check_fused_eager_restore, effect, guided, recorded_rows
from support.tolerances import MIN_EFFECT, close

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")]  # FluxControlNetModel

# name -> (pipeline factory, input factory, has true CFG)
VARIANTS = {
    "img2img": (F.flux_img2img, F.flux_img2img_inputs, True),
    "inpaint": (F.flux_inpaint, F.flux_inpaint_inputs, True),
    "fill": (F.flux_fill, F.flux_fill_inputs, False),
    "kontext": (F.flux_kontext, F.flux_kontext_inputs, True),
    "controlnet": (F.flux_controlnet, F.flux_controlnet_inputs, True),
}
TRUE_CFG = [name for name, (_, _, cfg) in VARIANTS.items() if cfg]
HEADS = "0:1,2:0@0.5"  # layer 0 is the double block, 1 and 2 the single blocks (one index space)
_PIPES: dict = {}


def pipe_of(name: str):
    if name not in _PIPES:
        _PIPES[name] = VARIANTS[name][0]()
    return _PIPES[name]


def inputs_of(name: str, *, cfg: bool = True, **kw) -> dict:
    make, has_cfg = VARIANTS[name][1], VARIANTS[name][2]
    if has_cfg:
        kw["true_cfg_scale"] = 4.0 if cfg else 1.0
    return make(**kw)


def test_layers_and_patterns():
    """Every variant's denoiser is the Flux transformer (the ControlNet model is not a layer source): one index
    space over the double then the single blocks; each pipeline has its call pattern."""
    expected = [("transformer_blocks.0.attn", "transformer_blocks.0"),
                ("single_transformer_blocks.0.attn", "single_transformer_blocks.0"),
                ("single_transformer_blocks.1.attn", "single_transformer_blocks.1")]
    for name in VARIANTS:
        pipe = pipe_of(name)
        assert headpag.get_denoiser(pipe) is pipe.transformer
        layers = headpag.list_layers(pipe)
        assert [(x.name, x.fork_unit) for x in layers] == expected, name
        assert [(x.index, x.heads, x.head_dim, x.kind) for x in layers] == [(i, 2, 16, "joint") for i in range(3)]
        pattern = headpag.archs.call_pattern_of(pipe)
        assert pattern.name == ("separate" if name == "fill" else "separate_calls"), name
        assert pattern.cfg_off == {}  # true CFG is off by default (true_cfg_scale=1)


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("name, cfg", [pytest.param(name, True, id=name + ("-true-cfg" if name in TRUE_CFG else ""))
                                       for name in VARIANTS] +
                         [pytest.param(name, False, id=f"{name}-no-cfg") for name in TRUE_CFG])
def test_fused_eager_restore(name, cfg, mode):
    check_fused_eager_restore(pipe_of(name), inputs_of(name, cfg=cfg), HEADS, mode=mode)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_prompts_two_images(name):
    check_fused_eager_restore(pipe_of(name), inputs_of(name, prompts=2, images_per_prompt=2), HEADS, mode="image")


@pytest.mark.parametrize("heads", ["2:*", "0:0"], ids=["fork-at-single-block", "fork-at-double-block"])
def test_controlnet_residuals(heads):
    """The ControlNet residual lists are per-row arguments: they get the twins at entry, and are added to the
    blocks' outputs whether the twins forked before or after them."""
    pipe = pipe_of("controlnet")
    inputs = inputs_of("controlnet")
    assert effect(M.run(pipe, inputs), M.run(pipe, inputs | {"controlnet_conditioning_scale": 0.0})) > MIN_EFFECT
    check_fused_eager_restore(pipe, inputs, heads)


@pytest.mark.parametrize("name", TRUE_CFG)
def test_uncond_call_gets_the_cond_delta(name):
    """One step: guided - plain is the same with true CFG on (4.0) and off."""
    pipe = pipe_of(name)
    one_step = dict(steps=1, strength=1.0) if name in ("img2img", "inpaint") else dict(steps=1)
    shifts = {}
    for cfg in (True, False):
        inputs = inputs_of(name, cfg=cfg, **one_step)
        shifts[cfg] = guided(pipe, "fused", HEADS, inputs) - M.run(pipe, inputs)
    assert effect(shifts[False], torch.zeros_like(shifts[False])) > MIN_EFFECT
    close(shifts[True], shifts[False], "families")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_counts_calls(name):
    """With true CFG each step makes a cond call carrying the twins and an uncond call without them."""
    pipe = pipe_of(name)
    with recorded_rows({"block0": pipe.transformer.transformer_blocks[0]}) as log:
        with headpag.fused(pipe, "0:0"):
            M.run(pipe, inputs_of(name, prompts=1, steps=2))
    assert log["block0"] == ([2, 1, 2, 1] if VARIANTS[name][2] else [2, 2])


def test_kontext_token_layout():
    """Kontext appends the reference image's tokens to the image tokens (ids and hidden_states alike); the text
    tokens stay first, so mode="image" gets n_text = the prompt length and the image identity covers both. Text
    first is checked on the values of the double block's joint attention (the text stream's own projection)."""
    pipe = pipe_of("kontext")
    tokens = (F.SIZE // 4) ** 2
    for reference, n_image in ((True, 2 * tokens), (False, tokens)):
        handle, text = F.text_values(pipe.transformer.transformer_blocks[0].attn)
        try:
            with F.routed_calls() as calls, recorded_rows({"x_embedder": pipe.transformer.x_embedder}) as log:
                with headpag.fused(pipe, "0:0,2:1", mode="image"):
                    out = M.run(pipe, inputs_of("kontext", reference=reference, prompts=1, steps=1))
        finally:
            handle.remove()
        assert out.shape[1] == tokens  # the pipeline keeps the image tokens' prediction only
        assert log["x_embedder"] == [2, 1]  # the cond call with its twin, the uncond call
        assert [c["layer"] for c in calls] == ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
        for c in calls:
            assert (c["n_text"], c["text_first"], c["v"].shape[1]) == (F.TEXT_LEN, True, F.TEXT_LEN + n_image)
        assert torch.equal(calls[0]["v"][:, :F.TEXT_LEN], text[0])


def test_fill_hidden_states_carry_the_mask_channels():
    """Fill's 48 input channels (latents, masked-image latents, mask) are one per-row tensor: the twins get them."""
    pipe = pipe_of("fill")
    shapes = []
    handle = pipe.transformer.x_embedder.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    try:
        with headpag.fused(pipe, "1:0"):
            M.run(pipe, inputs_of("fill", prompts=1, steps=1))
    finally:
        handle.remove()
    assert shapes == [(2, (F.SIZE // 4) ** 2, 48)]
