"""Fused == eager (the separate perturbed forward with the maps materialised) on every tiny pipeline of
tests/support/models.py, for head subsets, SoftPAG and several layers, with and without CFG; and in bfloat16."""

from __future__ import annotations

import pytest
import torch

from support import models as M
from support.checks import MIN_EFFECT, close, effect, guided, n_layers, with_plain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# bf16: ||fused - eager|| must stay below this fraction of the guidance effect ||eager - plain|| (observed 0.13
# on SD3, 0.38 on SD1.5)
BF16_EFFECT_RATIO = 0.5

# Head selections, given the number of layers n: a multi-head subset of one layer, SoftPAG, several layers with
# mixed per-head u (including a wildcard layer).
SELECTIONS = {
    "subset": (lambda n: f"{n // 2}:0,{n // 2}:2", None),
    "soft": (lambda n: f"{n - 1}:1,{n - 1}:3", 0.5),
    "several_layers": (lambda n: f"0:1,{n // 2}:*@0.5,{n - 1}:0,{n - 1}:3@0.25", None),
}


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("model", ["sd3", "sd35", "sd15", "sdxl", "dit"])
def test_fused_equals_eager(model, selection, cfg):
    pipe, inputs, plain = with_plain(model, batch=2, **({} if cfg else {"cfg": 1.0}))
    spec, u = SELECTIONS[selection]
    heads = spec(n_layers(pipe))
    eager = guided(pipe, "eager", heads, inputs, scale=2.0, u=u)
    fused = guided(pipe, "fused", heads, inputs, scale=2.0, u=u)
    assert effect(eager, plain) > MIN_EFFECT, "the selection does not change the output: vacuous comparison"
    close(fused, eager, "fp32", f"{model} {heads} u={u}")


def to_dtype(inputs: dict, dtype) -> dict:
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


@pytest.mark.parametrize("model", ["sd3", "sd15"])
def test_bfloat16(model):
    pipe, inputs = M.make(model, batch=2)
    pipe, inputs = pipe.to(torch.bfloat16), to_dtype(inputs, torch.bfloat16)
    plain = M.run(pipe, inputs)
    assert plain.dtype == torch.bfloat16
    heads = f"1:0,1:2,{n_layers(pipe) - 1}:1@0.5"
    eager = guided(pipe, "eager", heads, inputs, scale=3.0)
    fused = guided(pipe, "fused", heads, inputs, scale=3.0)
    assert fused.dtype == torch.bfloat16
    close(fused, eager, "bf16")
    fused, eager, plain = fused.float(), eager.float(), plain.float()
    assert (fused - eager).norm() < BF16_EFFECT_RATIO * (eager - plain).norm()
    assert torch.equal(guided(pipe, "fused", heads, inputs, scale=0.0), plain)
