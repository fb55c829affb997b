"""UNets (SD1.5, SDXL, SD1.5 with ControlNet): against diffusers' ``StableDiffusionPAGPipeline``, against
``apply_layer_skip(..., skip_attention_scores=True)`` on a copy of the UNet folded in by the reference hook, the
fork units, and ControlNet residuals reaching post-fork units."""

from __future__ import annotations

import copy

import pytest
from diffusers import StableDiffusionPAGPipeline
from diffusers.hooks import LayerSkipConfig, apply_layer_skip

import headpag
from support import models as M
from support.checks import check_fused_eager_restore, check_matches_peer, layer_index, patched, recorded_rows
from support.reference import check_matches_reference, module_pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no_cfg"])
def test_sd15_matches_diffusers_pag_pipeline(cfg):
    pipe, inputs = M.make("sd15", batch=2, num_images_per_prompt=2, cfg=cfg)
    check_matches_peer(pipe, inputs, StableDiffusionPAGPipeline, f"{layer_index(pipe, 'mid_block')}:*", rows=(4,),
                       requires_safety_checker=False, pag_applied_layers="mid")


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("model,prefix", [
    ("sd15", "down_blocks.0.attentions.0"),  # followed by resnets[1] in the same down block: the fork-unit case
    ("sd15", "mid_block"),
    ("sd15", "up_blocks.1.attentions.2"),  # the last layer
    ("sdxl", "down_blocks.1.attentions.0.transformer_blocks.1"),  # 2nd BasicTransformerBlock of a Transformer2DModel
])
def test_unet_matches_apply_layer_skip(model, prefix, cfg):
    pipe, inputs = M.make(model, batch=2, **({} if cfg else {"cfg": 1.0}))
    layer = headpag.list_layers(pipe)[layer_index(pipe, prefix)]
    fqn, block = layer.name.rsplit(".", 1)[0].rsplit(".", 1)  # "<...>.transformer_blocks", "<k>" (".attn1" dropped)
    skipping = copy.deepcopy(pipe.unet)
    apply_layer_skip(skipping, LayerSkipConfig(indices=[int(block)], fqn=fqn, skip_attention=False,
                                               skip_attention_scores=True, skip_ff=False))
    check_matches_reference(pipe, inputs, f"{layer.index}:*", module_pass(skipping), scale=3.0, kind="fp32",
                            label=layer.name, mode="joint")


def test_unet_fork_units():
    """SD1.5: a head in the last up layer forks at up_blocks.1; a head in down_blocks.0.attentions.1 forks at the
    whole down_blocks.0 (its resnets[0] already carries the twins)."""
    pipe, inputs = M.make("sd15", batch=2)  # 4 base rows, 2 twins
    unet = pipe.unet
    units = {"down0": unet.down_blocks[0].resnets[0], "down1": unet.down_blocks[1].resnets[0],
             "mid": unet.mid_block.resnets[0], "up0": unet.up_blocks[0].resnets[0], "up1": unet.up_blocks[1].resnets[0],
             "conv_out": unet.conv_out}
    expected = {
        "up_blocks.1.attentions.2": {"down0": 4, "down1": 4, "mid": 4, "up0": 4, "up1": 6, "conv_out": 6},
        "down_blocks.0.attentions.1": {name: 6 for name in units},
        "mid_block": {"down0": 4, "down1": 4, "mid": 6, "up0": 6, "up1": 6, "conv_out": 6},
    }
    for prefix, rows in expected.items():
        with patched(pipe, "fused", f"{layer_index(pipe, prefix)}:1", scale=3.0), recorded_rows(units) as log:
            M.run(pipe, inputs)
        assert {name: set(v) for name, v in log.items()} == {name: {n} for name, n in rows.items()}, prefix


@pytest.fixture(scope="module")
def controlnet_pipe():
    return M.sd15_controlnet()


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_controlnet_residuals(controlnet_pipe, guidance_scale):
    mid = layer_index(controlnet_pipe, "mid_block")
    # A head before the mid block: the down-block residuals of the ControlNet reach post-fork units.
    check_fused_eager_restore(controlnet_pipe, M.controlnet_inputs(cfg=guidance_scale), f"0:1,{mid}:0@0.5")
