"""SD3 (joint attention): against diffusers' ``StableDiffusion3PAGPipeline`` (layer-level PAG == every head of that
layer with ``u = 1``), the fork at the last block, and skip-layer guidance together with PAG against diffusers'
``PAGJointAttnProcessor2_0`` on a copy of the transformer folded in by the reference hook."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusion3PAGPipeline
from diffusers.models.attention_processor import PAGJointAttnProcessor2_0

from support import models as M
from support.checks import (
    ENABLE, MIN_EFFECT, check_matches_peer, close, effect, fork_rows, guided, recorded_rows, with_plain,
)
from support.reference import fold_hook, select_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no_cfg"])
def test_sd3_matches_diffusers_pag_pipeline(cfg):
    pipe, inputs = M.make("sd3", batch=2, num_images_per_prompt=2, cfg=cfg)
    check_matches_peer(pipe, inputs, StableDiffusion3PAGPipeline, "1:*", rows=(4,), mode="image",
                       pag_applied_layers=[r"blocks\.1\.attn$"])


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
def test_sd3_fork_at_the_last_block(cfg):
    # Inner modules are observed (norm1 gets the block's hidden states): a forward pre-hook on the block itself
    # would see the arguments before headpag's hook narrows them.
    pipe, inputs = M.make("sd3", batch=2, **({} if cfg else {"cfg": 1.0}))
    log, before, after = fork_rows(pipe, inputs, "2:1", pipe.transformer.transformer_blocks, cfg=cfg)
    assert log["block0"] == log["block1"] == before
    assert log["block2"] == log["norm_out"] == after


def pag_processor_pass(pipe, layer: int):
    """The perturbed pass of diffusers' SD3 PAG: ``PAGJointAttnProcessor2_0`` on layer ``layer`` of a copy of the
    transformer, run on the rows ``[cond, cond]`` (its second half is the perturbed one)."""
    perturbed = copy.deepcopy(pipe.transformer)
    perturbed.transformer_blocks[layer].attn.processor = PAGJointAttnProcessor2_0()

    def run(args, kwargs):
        rows = kwargs["hidden_states"].shape[0]
        return perturbed(*args, **select_rows(kwargs, rows, torch.arange(rows).repeat(2)))[0][rows:]

    return run


def test_sd3_skip_layer_guidance_with_pag():
    """Main calls get ``delta`` on the uncond and cond rows, the skip-layer call of the same step gets it too, so
    the pipeline computes ``u + s (c - u) + w (c - p) + s_slg (c - slg)``."""
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
               skip_layer_guidance_scale=2.0)
    pipe, inputs, plain_slg = with_plain("sd3", steps=3, **slg)  # SLG runs on steps 1 and 2 (i > start * T)
    no_slg = M.run(pipe, {k: v for k, v in inputs.items() if k not in slg})
    handle = fold_hook(pipe, pag_processor_pass(pipe, 1), scale=3.0)
    try:
        expected = M.run(pipe, inputs)
    finally:
        handle.remove()
    assert effect(expected, plain_slg) > MIN_EFFECT and effect(plain_slg, no_slg) > MIN_EFFECT

    calls = []
    record = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append("slg" if k.get("skip_layers") is not None else "main"), with_kwargs=True)
    try:
        for execution in ENABLE:
            calls.clear()
            with recorded_rows({"block1": pipe.transformer.transformer_blocks[1].norm1}) as log:
                out = guided(pipe, execution, "1:*", inputs, scale=3.0, mode="image")
            close(out, expected, "fp32", execution)
            assert calls == ["main", "main", "slg", "main", "slg"]
            if execution == "fused":  # the skip-layer call keeps its single cond row
                assert log["block1"] == [3, 3, 1, 3, 1]
            else:
                assert log["block1"] == [2, 1, 2, 1, 1, 2, 1, 1]
        assert torch.equal(guided(pipe, "fused", "1:*", inputs, scale=0.0), plain_slg)
    finally:
        record.remove()
