"""AuraFlow (AuraFlowPipeline): MMDiT blocks then single DiT blocks in one index space, text-first joint attention
whose text side starts with the model's 8 register tokens, one call per step with rows ``[uncond, cond]`` under CFG
(a local of the pipeline's ``__call__``), ``t / 1000`` timesteps.

Oracles: the eager implementation; a masked SDPA (every off-diagonal pair masked, for ``mode="joint"``; among the
image tokens after the 8 register + text tokens, for ``mode="image"``) run as the perturbed pass of a reference
fold; the unpatched pipeline for ``scale=0`` / after disable."""

from __future__ import annotations

import pytest
import torch
from diffusers import AuraFlowTransformer2DModel

import headpag
from headpag.archs import forward_units
from support import models as M
from support import models_auraflow as A
from support.checks import check_fused_eager_restore, forward_order, recorded_rows
from support.reference import check_matches_reference, module_pass, sdpa_perturbed_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: a joint block and a single block; block 0 runs the base rows only; a soft head
HEADS = "1:0,3:2@0.5"
NAMES = [f"joint_transformer_blocks.{i}" for i in range(A.MMDIT)] + \
        [f"single_transformer_blocks.{j}" for j in range(A.SINGLE)]


@pytest.fixture(scope="module")
def pipe():
    return A.pipeline()


# --- layers --------------------------------------------------------------------------------------------------------


def test_list_layers():
    torch.manual_seed(0)
    model = A.transformer()
    layers = headpag.list_layers(model)
    assert [(x.index, x.name, x.fork_unit) for x in layers] == [(i, f"{n}.attn", n) for i, n in enumerate(NAMES)]
    assert {(x.heads, x.head_dim, x.kind) for x in layers} == {(A.HEADS, A.HEAD_DIM, "joint")}
    assert forward_units(model) == NAMES
    assert {type(model.get_submodule(x.name).processor).__name__ for x in layers} == {"AuraFlowAttnProcessor2_0"}
    calls = forward_order({x.name: model.get_submodule(x.name) for x in layers}, lambda: model(
        torch.randn(1, A.LATENT, 8, 8), encoder_hidden_states=torch.randn(1, A.TEXT_LEN, A.TEXT_DIM),
        timestep=torch.tensor([0.5])))
    assert calls == [x.name for x in layers]


def test_list_layers_of_the_real_config():
    """diffusers' defaults are AuraFlow's config: 4 + 32 blocks of 12 heads of 256 (meta device: no weights)."""
    with torch.device("meta"):
        model = AuraFlowTransformer2DModel()
    layers = headpag.list_layers(model)
    assert len(layers) == 36 and {(x.heads, x.head_dim) for x in layers} == {(12, 256)}
    assert layers[4].name == "single_transformer_blocks.0.attn"


# --- fused == eager == restored ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("heads", [HEADS, "2:*"], ids=["joint-and-single", "single-only"])
@pytest.mark.parametrize("guidance_scale", [3.5, 1.0], ids=["cfg", "no-cfg"])
def test_auraflow(pipe, guidance_scale, heads, mode):
    """2 prompts x 2 images, CFG on and off; a fork in a joint block and in the first single block."""
    check_fused_eager_restore(pipe, A.inputs(guidance_scale=guidance_scale), heads, mode=mode)


def test_calls_and_rows(pipe):
    """One call per step: [uncond, cond] under CFG (8 rows), twins of the 4 cond rows from the fork unit on."""
    blocks = {n: pipe.transformer.get_submodule(f"{n}.attn") for n in ("joint_transformer_blocks.0",
                                                                       "joint_transformer_blocks.1",
                                                                       "single_transformer_blocks.1")}
    with recorded_rows(blocks) as log, headpag.fused(pipe, "1:0"):
        M.run(pipe, A.inputs())
    assert list(log.values()) == [[8, 8], [12, 12], [12, 12]]
    with recorded_rows(blocks) as log, headpag.fused(pipe, "3:0"):
        M.run(pipe, A.inputs(guidance_scale=1.0))
    assert list(log.values()) == [[4, 4], [4, 4], [8, 8]]


def test_interval_reads_the_scheduler_timestep(pipe):
    """The pipeline passes t / 1000: interval (0, 0.5) of 4 steps guides steps 0 and 1 only."""
    with recorded_rows({"b1": pipe.transformer.joint_transformer_blocks[1].attn}) as log:
        with headpag.fused(pipe, "1:0", interval=(0.0, 0.5)):
            M.run(pipe, A.inputs(steps=4))
    assert log["b1"] == [12, 12, 8, 8]


# --- against independent perturbed passes --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("layer", [1, 2], ids=["joint-block", "single-block"])
@pytest.mark.parametrize("guidance_scale", [3.5, 1.0], ids=["cfg", "no-cfg"])
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(pipe, guidance_scale, layer, mode):
    """Every head of a layer with u=1 equals the reference fold (the delta of the cond rows, the second half under
    CFG, added to every row) of a masked SDPA on that layer: every pair off the diagonal masked (joint: the identity
    attention; diffusers' ``skip_attention_scores`` does not know AuraFlow's processor), or among the image tokens
    after the text side, the 8 register tokens plus the text (image): checks the register-token offset, the
    [uncond, cond] rows and the scale."""
    n_text = 0 if mode == "joint" else A.REGISTER + A.TEXT_LEN
    perturbed = sdpa_perturbed_copy(pipe, f"{NAMES[layer]}.attn", "image", n_text=n_text, text="first")
    check_matches_reference(pipe, A.inputs(guidance_scale=guidance_scale), f"{layer}:*", module_pass(perturbed),
                            scale=2.0, cfg=guidance_scale > 1, calls="one", cond="last", mode=mode)
