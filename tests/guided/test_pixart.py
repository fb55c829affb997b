"""PixArt: learned sigma and attention masks; fused == eager, and mode="joint" on every head of a layer against
diffusers' own identity attention."""

from __future__ import annotations

import copy

import pytest
from diffusers.hooks import LayerSkipConfig, apply_layer_skip

from support import models as M
from support.checks import ENABLE, check_fused_eager_restore, close, guided
from support.reference import fold_hook, module_pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pixart_pipe():
    return M.pixart()


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0], ids=["cfg", "no-cfg"])
def test_pixart(pixart_pipe, guidance_scale):
    check_fused_eager_restore(pixart_pipe, M.pixart_inputs(cfg=guidance_scale), "1:*")


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0], ids=["cfg", "no-cfg"])
def test_pixart_joint_mode_matches_apply_layer_skip(pixart_pipe, guidance_scale):
    """mode="joint" on every head of a PixArt layer equals diffusers' own identity attention
    (``apply_layer_skip(skip_attention_scores=True)``) run as the perturbed pass on the cond rows, folded with
    the fold ``delta = w * (cond - perturbed)`` by the reference hook on the plain pipeline's transformer."""
    skipping = copy.deepcopy(pixart_pipe.transformer)
    apply_layer_skip(skipping, LayerSkipConfig(indices=[1], fqn="transformer_blocks", skip_attention=False,
                                               skip_attention_scores=True, skip_ff=False))
    inputs = M.pixart_inputs(cfg=guidance_scale)
    handle = fold_hook(pixart_pipe, module_pass(skipping), scale=3.0, cfg=guidance_scale > 1)
    try:
        expected = M.run(pixart_pipe, inputs)
    finally:
        handle.remove()
    for execution in ENABLE:
        close(guided(pixart_pipe, execution, "1:*", inputs, scale=3.0, mode="joint"), expected, "families", execution)
