"""AnimateDiff (``UNetMotionModel``, frames folded into the batch): the layer table (spatial ``attn1`` only, never the
motion modules), against diffusers' ``AnimateDiffPAGPipeline``, fused == eager, and the fork rows in frame rows.

Videos of several frames need the core's ``Architecture.rows_per_sample`` (archs/animatediff.py): without it the
family is registered for its layer table, single-frame calls run, and videos raise ``NotImplementedError``.
"""

from __future__ import annotations

import pytest
from diffusers import AnimateDiffPAGPipeline

import headpag
from support import models_pag_families as F
from support.checks import check_fused_eager_restore, check_matches_peer, layer_index, patched, recorded_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def animatediff_pipe():
    return F.animatediff()


def test_animatediff_layers(animatediff_pipe):
    layers = headpag.list_layers(animatediff_pipe)
    block = "attentions.{}.transformer_blocks.0.attn1"
    assert [(l.name, l.heads, l.head_dim, l.kind, l.fork_unit) for l in layers] == [
        (f"down_blocks.0.{block.format(0)}", 4, 4, "self", "down_blocks.0"),
        (f"down_blocks.0.{block.format(1)}", 4, 4, "self", "down_blocks.0"),
        (f"mid_block.{block.format(0)}", 4, 8, "self", "mid_block"),
        *((f"up_blocks.1.{block.format(j)}", 4, 4, "self", "up_blocks.1") for j in range(3)),
    ]
    assert [l.index for l in layers] == list(range(6))
    assert headpag.archs.forward_units(animatediff_pipe) == [
        "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    # the motion modules hold self-attention too (over frames), and are not layers
    motion = [n for n, m in animatediff_pipe.unet.named_modules() if n.endswith("attn1") and "motion_modules" in n]
    assert motion and not {l.name for l in layers} & set(motion)


@pytest.mark.parametrize("cfg", [7.5, 1.0], ids=["cfg", "no_cfg"])
def test_animatediff_single_frame(animatediff_pipe, cfg):
    """One frame per video: frame rows are sample rows."""
    check_fused_eager_restore(animatediff_pipe, F.animatediff_inputs(cfg=cfg, num_frames=1), "0:1,2:0@0.5", scale=3.0,
                              run=F.run_video)


@pytest.mark.parametrize("cfg", [7.5, 1.0], ids=["cfg", "no_cfg"])
def test_animatediff_matches_diffusers_pag_pipeline(animatediff_pipe, cfg):
    """diffusers' default ``"mid_block.*attn1"`` also matches the mid block's motion-module ``attn1`` (temporal
    self-attention); ``"mid_block.attentions.0"`` is the spatial layer alone."""
    pipe = animatediff_pipe
    check_matches_peer(pipe, F.animatediff_inputs(batch=2, cfg=cfg), AnimateDiffPAGPipeline,
                       f"{layer_index(pipe, 'mid_block')}:*", rows=(2, 4, F.ANIMATEDIFF_FRAMES), run=F.run_video,
                       pag_applied_layers=["mid_block.attentions.0"])


@pytest.mark.parametrize("cfg", [7.5, 1.0], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("heads", [
    "0:1,2:0@0.5",  # fork at down_blocks.0: every unit carries the twins' frame rows
    "4:*@0.7,5:2",  # fork at the last up block: the skips of earlier units are widened copies
])
def test_animatediff_fused_eager_restore(animatediff_pipe, heads, cfg):
    check_fused_eager_restore(animatediff_pipe, F.animatediff_inputs(batch=2, cfg=cfg), heads, scale=3.0,
                              run=F.run_video)


def test_animatediff_without_mid_block_motion():
    """An adapter without a mid-block motion module: the mid block is a plain ``UNetMidBlock2DCrossAttn``."""
    pipe = F.animatediff(motion_mid_block=False)
    assert type(pipe.unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    check_fused_eager_restore(pipe, F.animatediff_inputs(batch=2), "2:*@0.8,3:1", scale=3.0, run=F.run_video)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
def test_animatediff_fork_rows(animatediff_pipe, cfg):
    """A head in the mid block: the down blocks run the base samples' frame rows only; from the mid block on every
    unit (and its motion modules) carries the twins' frame rows too."""
    pipe = animatediff_pipe
    inputs = F.animatediff_inputs(batch=2, **({} if cfg else {"cfg": 1.0}))
    frames, n_cond = F.ANIMATEDIFF_FRAMES, 2
    n_base = 2 * n_cond if cfg else n_cond
    unet = pipe.unet
    units = {"down0": unet.down_blocks[0].resnets[0], "down1": unet.down_blocks[1].resnets[0],
             "mid": unet.mid_block.resnets[0], "mid_motion": unet.mid_block.motion_modules[0],
             "up0": unet.up_blocks[0].resnets[0], "up1": unet.up_blocks[1].resnets[0], "conv_out": unet.conv_out}
    with patched(pipe, "fused", f"{layer_index(pipe, 'mid_block')}:1", scale=3.0), recorded_rows(units) as log:
        F.run_video(pipe, inputs)
    before, after = n_base * frames, (n_base + n_cond) * frames
    assert {name: set(rows) for name, rows in log.items()} == {
        "down0": {before}, "down1": {before}, "mid": {after}, "mid_motion": {after}, "up0": {after}, "up1": {after},
        "conv_out": {after}}
