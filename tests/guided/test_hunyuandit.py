"""HunyuanDiT: the layer table, against diffusers' ``HunyuanDiTPAGPipeline`` (layer-level PAG == every head of that
layer with ``u = 1``), fused == eager with the long skips crossing the fork, and the fork rows."""

from __future__ import annotations

import pytest
from diffusers import HunyuanDiTPAGPipeline

import headpag
from support import models_pag_families as F
from support.checks import check_fused_eager_restore, check_matches_peer, fork_rows, layer_index, layer_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hunyuan_pipe():
    return F.hunyuandit()


def test_hunyuandit_layers(hunyuan_pipe):
    assert layer_table(hunyuan_pipe) == [(i, f"blocks.{i}.attn1", 2, 8, "self", f"blocks.{i}") for i in range(6)]
    assert headpag.archs.forward_units(hunyuan_pipe) == [f"blocks.{i}" for i in range(6)]
    assert headpag.archs.architecture_of(hunyuan_pipe).processors == ("HunyuanAttnProcessor2_0",)


# diffusers' HunyuanDiTPAGPipeline without CFG stacks ``image_meta_size`` / ``style`` three times (as with CFG) for
# two rows per sample, which only a v1.2-style model (no such conditioning) survives: no-CFG parity runs on one.
@pytest.mark.parametrize("cfg,style_cond,rescale", [(5.0, True, 0.0), (5.0, False, 0.0), (1.0, False, 0.0),
                                                    (5.0, True, 0.7)],
                         ids=["cfg-v1.1", "cfg-v1.2", "no_cfg-v1.2", "cfg-v1.1-guidance_rescale"])
def test_hunyuandit_matches_diffusers_pag_pipeline(cfg, style_cond, rescale):
    """guidance_rescale is applied against the unperturbed cond prediction, as the PAG pipeline applies it."""
    pipe = F.hunyuandit(style_cond=style_cond)
    inputs = F.hunyuandit_inputs(batch=2, num_images_per_prompt=2, cfg=cfg) | {"guidance_rescale": rescale}
    check_matches_peer(pipe, inputs, HunyuanDiTPAGPipeline, f"{layer_index(pipe, 'blocks.4.')}:*", rows=(4,),
                       requires_safety_checker=False, pag_applied_layers=["blocks.4"])


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("heads", [
    "1:0,4:1@0.5",  # fork at block 1, whose output is block 4's long skip
    "5:*@0.7",  # fork at the last block: its skip (block 0's output) comes from before the fork
    "3:1,2:0@0.3",  # between the skip writers and readers
])
def test_hunyuandit_fused_eager_restore(hunyuan_pipe, heads, cfg):
    inputs = F.hunyuandit_inputs(batch=2, num_images_per_prompt=2, cfg=cfg)
    check_fused_eager_restore(hunyuan_pipe, inputs, heads, scale=3.0)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
def test_hunyuandit_fork_rows(hunyuan_pipe, cfg):
    """A head in block 4: blocks 0-3 run the base rows only, blocks 4 and 5 (and the output) carry the twins; the
    skip tensor block 4 reads (block 1's output) arrives with the twins, copied from the cond rows."""
    inputs = F.hunyuandit_inputs(batch=2, **({} if cfg else {"cfg": 1.0}))
    blocks = hunyuan_pipe.transformer.blocks
    log, before, after = fork_rows(hunyuan_pipe, inputs, "4:0", blocks, cfg=cfg, skip4=blocks[4].skip_norm)
    for i in range(4):
        assert log[f"block{i}"] == before, i
    assert log["block4"] == log["block5"] == log["skip4"] == log["norm_out"] == after
