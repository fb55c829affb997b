"""CogView4 (CogView4Pipeline, CogView4ControlPipeline): MMDiT blocks with text-first joint attention, CFG as
separate cond and uncond calls (named by cache context in the text-to-image pipeline, unnamed in the control one;
the cond call carries the twins, the uncond call gets its delta), scheduler timesteps passed as they are.

Oracles: the eager implementation; diffusers' own identity attention (``apply_layer_skip(skip_attention_scores=
True)``) for ``mode="joint"`` and a text-first masked SDPA for ``mode="image"``, each run as the perturbed pass of a
reference fold; the unpatched pipeline for ``scale=0`` / after disable."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import CogView4Transformer2DModel
from diffusers.hooks import LayerSkipConfig, apply_layer_skip

import headpag
from headpag.archs import forward_units
from support import models as M
from support import models_cogview4 as C
from support.checks import check_fused_eager_restore, forward_order, recorded_rows
from support.reference import check_matches_reference, module_pass, sdpa_perturbed_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = list(C.PIPELINES)
HEADS = "1:0,2:3@0.5"  # block 0 runs the base rows only; a soft head in the last block


@pytest.fixture(scope="module")
def pipes():
    return {kind: C.pipeline(kind) for kind in KINDS}


# --- layers --------------------------------------------------------------------------------------------------------


def test_list_layers():
    torch.manual_seed(0)
    model = C.transformer()
    layers = headpag.list_layers(model)
    assert [(x.index, x.name, x.fork_unit) for x in layers] == [
        (i, f"transformer_blocks.{i}.attn1", f"transformer_blocks.{i}") for i in range(C.LAYERS)]
    assert {(x.heads, x.head_dim, x.kind) for x in layers} == {(C.HEADS, C.HEAD_DIM, "joint")}
    assert forward_units(model) == [f"transformer_blocks.{i}" for i in range(C.LAYERS)]
    assert {type(model.get_submodule(x.name).processor).__name__ for x in layers} == {"CogView4AttnProcessor"}
    size = torch.tensor([[C.SIZE, C.SIZE]], dtype=torch.float32)
    calls = forward_order({x.name: model.get_submodule(x.name) for x in layers}, lambda: model(
        hidden_states=torch.randn(1, C.LATENT, 8, 8), encoder_hidden_states=torch.randn(1, 5, C.TEXT_DIM),
        timestep=torch.tensor([500.0]), original_size=size, target_size=size, crop_coords=size * 0))
    assert calls == [x.name for x in layers]


def test_list_layers_of_the_real_config():
    """CogView4-6B's transformer config (diffusers' convert_cogview4_to_diffusers.py): 28 blocks of 32 heads of 128
    (meta device: no weights)."""
    with torch.device("meta"):
        model = CogView4Transformer2DModel(num_layers=28, num_attention_heads=32, attention_head_dim=128)
    layers = headpag.list_layers(model)
    assert len(layers) == 28 and {(x.heads, x.head_dim) for x in layers} == {(32, 128)}


# --- fused == eager == restored ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind", KINDS)
def test_cogview4(pipes, kind, guidance_scale, mode):
    """2 prompts x 2 images, CFG on and off."""
    check_fused_eager_restore(pipes[kind], C.inputs(kind, guidance_scale=guidance_scale), HEADS, mode=mode)


@pytest.mark.parametrize("kind", KINDS)
def test_calls_and_rows(pipes, kind):
    """Per step: the cond call carries one twin per row from the first selected block on, the CFG uncond call none;
    without CFG one call per step, twins included."""
    pipe = pipes[kind]
    blocks = {f"block{i}": pipe.transformer.transformer_blocks[i].attn1 for i in range(2)}
    with recorded_rows(blocks) as log, headpag.fused(pipe, "1:0"):
        M.run(pipe, C.inputs(kind))
    assert log["block0"] == [4, 4, 4, 4]
    assert log["block1"] == [8, 4, 8, 4]
    with recorded_rows(blocks) as log, headpag.fused(pipe, "1:0"):
        M.run(pipe, C.inputs(kind, guidance_scale=1.0))
    assert log["block0"] == [4, 4]
    assert log["block1"] == [8, 8]


def test_interval_reads_the_scheduler_timestep(pipes):
    """The pipeline passes the scheduler's timesteps: interval (0, 0.5) of 4 steps guides steps 0 and 1 only."""
    pipe = pipes["t2i"]
    with recorded_rows({"block1": pipe.transformer.transformer_blocks[1].attn1}) as log:
        with headpag.fused(pipe, "1:0", interval=(0.0, 0.5)):
            M.run(pipe, C.inputs("t2i", steps=4))
    assert log["block1"] == [8, 4, 8, 4, 4, 4, 4, 4]


def test_no_mask_reaches_the_layers(pipes):
    """The pipelines never pass ``attention_mask``: the layers' attention is unmasked in normal use."""
    pipe = pipes["t2i"]
    seen = []
    handle = pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        M.run(pipe, C.inputs("t2i", steps=1))
    finally:
        handle.remove()
    assert seen == [None, None]


# --- against independent perturbed passes --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(pipes, kind, guidance_scale, mode):
    """Every head of layer 1 with u=1 equals the reference fold (the cond call's delta, given to the uncond call
    too) of diffusers' identity attention (joint) or of a text-first masked SDPA (image) on that layer: checks the
    text-first order, the fold into both CFG calls and the scale."""
    pipe = pipes[kind]
    if mode == "joint":
        perturbed = copy.deepcopy(pipe.transformer)
        apply_layer_skip(perturbed, LayerSkipConfig(indices=[1], fqn="transformer_blocks", skip_attention=False,
                                                    skip_attention_scores=True, skip_ff=False))
    else:  # the processor's [text, image] order
        perturbed = sdpa_perturbed_copy(pipe, "transformer_blocks.1.attn1", mode, n_text=C.TEXT_LEN, text="first")
    check_matches_reference(pipe, C.inputs(kind, guidance_scale=guidance_scale), "1:*", module_pass(perturbed),
                            scale=2.0, cfg=guidance_scale > 1, calls="separate", mode=mode)
