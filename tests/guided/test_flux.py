"""Flux: one index space over double and single blocks, rotary embeddings, and true CFG's separate cond and uncond
calls (the cond call carries the twins). Oracle: the eager implementation, and the unpatched pipeline for scale=0 /
after disable."""

from __future__ import annotations

import pytest

from support import models as M
from support.checks import check_fused_eager_restore, guided_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def flux_pipe():
    return M.flux()


@pytest.mark.parametrize("true_cfg_scale", [4.0, 1.0], ids=["true-cfg", "distilled"])
@pytest.mark.parametrize("mode", ["joint", "image"])
def test_flux(flux_pipe, true_cfg_scale, mode):
    # layer 0 is the double block, 1 and 2 the single blocks (one index space)
    check_fused_eager_restore(flux_pipe, M.flux_inputs(true_cfg_scale=true_cfg_scale), "0:1,2:0@0.5", mode=mode)


def test_flux_counts_calls(flux_pipe):
    """With true CFG each step makes two denoiser calls: the cond call carries the twins, the uncond call not."""
    block0 = {"block0": flux_pipe.transformer.transformer_blocks[0]}
    log, _ = guided_rows(flux_pipe, block0, "fused", "0:0", M.flux_inputs(batch=1, true_cfg_scale=4.0, steps=2))
    assert log["block0"] == [2, 1, 2, 1]
