"""DiT: rows ``[cond, uncond]``, class labels and learned sigma; fused == eager, and the fork rows."""

from __future__ import annotations

import pytest

from support import models as M
from support.checks import check_fused_eager_restore, patched, recorded_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("guidance_scale", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_dit(guidance_scale):
    pipe = M.dit(heads=2, num_layers=2, clip_sample=True)
    inputs = M.dit_inputs(batch=2, cfg=guidance_scale, steps=3, class_labels=[3, 5], output_type="latent")
    check_fused_eager_restore(pipe, inputs, "1:0,0:1@0.5")


def test_dit_fork_rows():
    pipe, inputs = M.make("dit", batch=2)  # rows [cond, cond, uncond, uncond] + 2 twins
    blocks = {f"block{i}": b.norm1 for i, b in enumerate(pipe.transformer.transformer_blocks)}
    with patched(pipe, "fused", "1:0,1:3", scale=3.0), recorded_rows(blocks) as log:
        M.run(pipe, inputs)
    assert set(log["block0"]) == {4} and set(log["block1"]) == {6} and set(log["block2"]) == {6}
