"""``adaptive_scale`` (diffusers' ``pag_adaptive_scale``) and the pipeline's ``guidance_rescale`` against diffusers'
own PAG pipelines: every head of the layers they perturb, u = 1, PAG scale 3, 2 prompts, SD1.5 and SDXL.

Timesteps of the 3-step tiny pipelines: SD1.5 667, 334, 1 and SDXL 999, 499, 0 (``TIMESTEPS``): with ``a = 0.005``
the scale floors at 0 on the later steps; with ``a = 0.002`` every step keeps a positive, different scale."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

import headpag
from support import models as M
from support.checks import ENABLE, effect, guided, patched, recorded_rows
from support.tolerances import MIN_EFFECT, close

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PEERS = {"sd15": (StableDiffusionPAGPipeline, dict(requires_safety_checker=False)),
         "sdxl": (StableDiffusionXLPAGPipeline, {})}
TIMESTEPS = {"sd15": [667, 334, 1], "sdxl": [999, 499, 0]}
_PIPES: dict = {}


def pipe_of(model: str):
    if model not in _PIPES:
        _PIPES[model] = M.make(model)[0]
    return _PIPES[model]


def mid_heads(pipe) -> str:
    """Every head of every layer in the mid block: what diffusers' pag_applied_layers="mid" perturbs."""
    return ",".join(f"{x.index}:*" for x in headpag.list_layers(pipe) if x.name.startswith("mid_block"))


def peer_run(pipe, model: str, inputs: dict) -> torch.Tensor:
    """diffusers' PAG pipeline on ``pipe``'s components, PAG on the mid block; the UNet's processors put back."""
    cls, kwargs = PEERS[model]
    processors = pipe.unet.attn_processors
    try:
        return M.run(M.peer(pipe, cls, pag_applied_layers="mid", **kwargs), {**inputs, "pag_scale": 3.0})
    finally:
        pipe.unet.set_attn_processor(processors)


@pytest.mark.parametrize("adaptive, rescale", [(0.0, 0.7), (0.002, 0.0), (0.005, 0.0), (0.002, 0.7)])
@pytest.mark.parametrize("model", list(PEERS))
def test_matches_diffusers_pag_pipeline(model, adaptive, rescale):
    pipe = pipe_of(model)
    inputs = M.make(model, batch=2, cfg=5.0, steps=3)[1] | {"guidance_rescale": rescale}
    pipe.scheduler.set_timesteps(3)
    assert [int(t) for t in pipe.scheduler.timesteps] == TIMESTEPS[model]
    expected = peer_run(pipe, model, {**inputs, "pag_adaptive_scale": adaptive})
    # each option changes diffusers' own output, so matching it checks the option
    assert effect(expected, peer_run(pipe, model, {**inputs, "guidance_rescale": 0.0, "pag_adaptive_scale": 0.0})) > MIN_EFFECT
    heads = mid_heads(pipe)
    for execution in ENABLE:
        out = guided(pipe, execution, heads, inputs, scale=3.0, u=1, adaptive_scale=adaptive)
        close(out, expected, "peer", f"{model} {execution} adaptive={adaptive} rescale={rescale}")


def test_a_step_whose_adaptive_scale_floors_at_zero_runs_no_perturbed_rows():
    """a = 0.005: the scale at t = 334 is 3 - 3.33 < 0 (and at t = 1 lower still), floored at 0: those steps run the
    base rows only."""
    pipe = pipe_of("sd15")
    inputs = M.make("sd15", batch=1, cfg=5.0, steps=3)[1]
    mid = {"mid": pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1}
    with recorded_rows(mid) as log, patched(pipe, "fused", mid_heads(pipe), scale=3.0,
                                            adaptive_scale=0.005):
        M.run(pipe, inputs)
    assert log["mid"] == [3, 2, 2]


def test_rescale_without_cfg_is_not_applied_and_the_wrapper_goes_away():
    """Without CFG diffusers' pipelines never rescale; after disable the pipeline module's rescale_noise_cfg is the
    original function again."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion as module

    original = module.rescale_noise_cfg
    pipe = pipe_of("sd15")
    inputs = M.make("sd15", batch=2, cfg=1.0, steps=3)[1]
    with patched(pipe, "fused", "0:0", scale=3.0):
        assert module.rescale_noise_cfg is not original
        plain_rescale = M.run(pipe, {**inputs, "guidance_rescale": 0.7})
        assert torch.equal(plain_rescale, M.run(pipe, inputs))
    assert module.rescale_noise_cfg is original


@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (float("nan"), ValueError), ("1", TypeError)])
def test_bad_adaptive_scale_is_refused(bad, error):
    pipe = pipe_of("sd15")
    with pytest.raises(error, match="adaptive_scale must be a finite number >= 0"):
        headpag.enable_fused(pipe, "0:0", adaptive_scale=bad)
    assert not headpag.is_enabled(pipe)


def test_configure_changes_the_adaptive_scale():
    pipe = pipe_of("sd15")
    inputs = M.make("sd15", batch=1, cfg=5.0, steps=3)[1]
    heads = mid_heads(pipe)
    expected = guided(pipe, "fused", heads, inputs, scale=3.0, adaptive_scale=0.002)
    with patched(pipe, "fused", heads, scale=3.0):
        headpag.configure(pipe, adaptive_scale=0.002)
        close(M.run(pipe, inputs), expected, "fp32")
        headpag.configure(pipe, scale=2.0)  # keeps the adaptive scale
        assert headpag.guided.session.session_of(pipe).settings.adaptive_scale == 0.002
