"""Lumina-Image 2.0 (Lumina2Pipeline): context and noise refiner blocks (forward-loop units without layers), then
main blocks with text-first joint attention over each row's effective caption (its unmasked tokens) and the image
tokens; CFG as unnamed cond and uncond calls on the same latents (the cond call carries the twins, the uncond call
gets its delta), truncated CFG steps with the cond call only, ``1 - t / 1000`` timesteps, a key mask at the main
layers only when a call's captions differ in length.

Oracles: the eager implementation; a masked SDPA (every off-diagonal pair masked, for ``mode="joint"``; among the
image tokens after the effective caption, for ``mode="image"``) run as the perturbed pass of a reference fold; the
unpatched pipeline for ``scale=0`` / after disable."""

from __future__ import annotations

import pytest
import torch
from diffusers import Lumina2Transformer2DModel

import headpag
from headpag.archs import forward_units
from support import models as M
from support import models_lumina2 as L
from support.checks import ENABLE, check_fused_eager_restore, close, effect, forward_order, guided, recorded_rows
from support.reference import check_matches_reference, module_pass, sdpa_perturbed_copy
from support.tolerances import MIN_EFFECT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS = "1:0,2:3@0.5"  # block 0 runs the base rows only; a soft head in the last block


@pytest.fixture(scope="module")
def pipe():
    return L.pipeline()


# --- layers --------------------------------------------------------------------------------------------------------


def test_list_layers():
    torch.manual_seed(0)
    model = L.transformer()
    layers = headpag.list_layers(model)
    assert [(x.index, x.name, x.fork_unit) for x in layers] == [
        (i, f"layers.{i}.attn", f"layers.{i}") for i in range(L.LAYERS)]
    assert {(x.heads, x.head_dim, x.kind) for x in layers} == {(L.HEADS, L.HEAD_DIM, "joint")}
    assert forward_units(model) == [f"context_refiner.{i}" for i in range(L.REFINERS)] + \
        [f"noise_refiner.{i}" for i in range(L.REFINERS)] + [f"layers.{i}" for i in range(L.LAYERS)]
    assert {type(model.get_submodule(x.name).processor).__name__ for x in layers} == {"Lumina2AttnProcessor2_0"}
    # forward order == unit order, and the main layers' order == index order
    calls = forward_order({u: model.get_submodule(f"{u}.attn") for u in forward_units(model)}, lambda: model(
        torch.randn(1, L.LATENT, 8, 8), timestep=torch.tensor([0.5]),
        encoder_hidden_states=torch.randn(1, L.TEXT_LEN, L.TEXT_DIM), encoder_attention_mask=L.mask(1)))
    assert calls == forward_units(model)


def test_list_layers_of_the_real_config():
    """diffusers' defaults are Lumina-Image-2.0's config: 26 main blocks of 24 heads of 96 (meta device)."""
    with torch.device("meta"):
        model = Lumina2Transformer2DModel()
    layers = headpag.list_layers(model)
    assert len(layers) == 26 and {(x.heads, x.head_dim) for x in layers} == {(24, 96)}
    assert len(forward_units(model)) == 2 + 2 + 26


# --- fused == eager == restored ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_lumina2(pipe, guidance_scale, mode):
    """2 prompts x 2 images, CFG on and off."""
    check_fused_eager_restore(pipe, L.inputs(guidance_scale=guidance_scale), HEADS, mode=mode)


@pytest.mark.parametrize("mode", ["joint", "image"])
def test_truncated_cfg(pipe, mode):
    """``cfg_trunc_ratio=0.5`` of 4 steps: steps 2 and 3 make the cond call only."""
    call = L.inputs(steps=4, cfg_trunc_ratio=0.5)
    check_fused_eager_restore(pipe, call, HEADS, mode=mode)
    with recorded_rows({"layer1": pipe.transformer.layers[1].attn}) as log, headpag.fused(pipe, "1:0"):
        M.run(pipe, call)
    assert log["layer1"] == [8, 4, 8, 4, 8, 8]


def test_calls_and_rows(pipe):
    """Per step: the cond call carries one twin per row from the first selected block on (not in the refiners),
    the CFG uncond call none."""
    modules = {"context": pipe.transformer.context_refiner[0].attn, "noise": pipe.transformer.noise_refiner[0].attn,
               "layer0": pipe.transformer.layers[0].attn, "layer1": pipe.transformer.layers[1].attn}
    with recorded_rows(modules) as log, headpag.fused(pipe, "1:0"):
        M.run(pipe, L.inputs())
    assert log == {"context": [4] * 4, "noise": [4] * 4, "layer0": [4] * 4, "layer1": [8, 4, 8, 4]}
    with recorded_rows(modules) as log, headpag.fused(pipe, "0:0"):
        M.run(pipe, L.inputs(guidance_scale=1.0))
    assert log == {"context": [4] * 2, "noise": [4] * 2, "layer0": [8] * 2, "layer1": [8] * 2}


def test_interval_reads_the_scheduler_timestep(pipe):
    """The pipeline passes 1 - t / 1000: interval (0, 0.5) of 4 steps guides steps 0 and 1 only."""
    with recorded_rows({"layer1": pipe.transformer.layers[1].attn}) as log:
        with headpag.fused(pipe, "1:0", interval=(0.0, 0.5)):
            M.run(pipe, L.inputs(steps=4))
    assert log["layer1"] == [8, 4, 8, 4, 4, 4, 4, 4]


# --- masks ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_captions_of_different_lengths_match_an_independent_perturbed_pass(pipe, guidance_scale):
    """Prompts of different effective lengths in one call bring a key mask to every main layer (row i is
    [caption_i, image, padding]): joint mode equals the reference fold of the identity attention (the values) on
    layer 1, fused and eager."""
    perturbed = sdpa_perturbed_copy(pipe, "layers.1.attn", "joint", n_text=0)
    check_matches_reference(pipe, L.inputs(lengths=[4, 3], guidance_scale=guidance_scale), "1:*",
                            module_pass(perturbed), scale=2.0, cfg=guidance_scale > 1, calls="separate", mode="joint")


def test_captions_of_different_lengths_refuse_image_mode(pipe):
    """Each row's image tokens start after its own caption: one text span per call cannot describe them, so
    mode="image" raises (before any output), naming mode="joint"."""
    for execution in ENABLE:
        with pytest.raises(ValueError, match="text tokens at different positions .* use mode='joint'"):
            guided(pipe, execution, "1:0", L.inputs(lengths=[4, 3]), mode="image")
    assert not headpag.is_enabled(pipe)


def test_negative_captions_of_different_lengths_are_fine(pipe):
    """The CFG uncond call is not forked (it gets the cond call's delta), so its mask never meets the perturbed
    attention."""
    call = L.inputs(negative_lengths=[4, 3, 2, 4])
    plain = M.run(pipe, call)
    fused, eager = (guided(pipe, execution, HEADS, call) for execution in ENABLE)
    close(fused, eager, "families")
    assert effect(fused, plain) > MIN_EFFECT


# --- against independent perturbed passes --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(pipe, guidance_scale, mode):
    """Every head of layer 1 with u=1 equals the reference fold (the cond call's delta, given to the uncond call
    too) of a masked SDPA on that layer: every pair off the diagonal masked (joint: the identity attention), or
    among the image tokens after the effective caption (image): checks the effective caption length (4 of 6
    tokens), the text-first order, the fold into both CFG calls and the scale."""
    n_text = 0 if mode == "joint" else L.EFFECTIVE
    perturbed = sdpa_perturbed_copy(pipe, "layers.1.attn", "image", n_text=n_text, text="first")
    check_matches_reference(pipe, L.inputs(guidance_scale=guidance_scale), "1:*", module_pass(perturbed), scale=2.0,
                            cfg=guidance_scale > 1, calls="separate", mode=mode)
