"""The state a guided call reads comes from the call being made.

- Steps are counted as the pipeline counts them, for every kind of scheduler: a second-order scheduler (Heun,
  DPM2) makes two denoiser calls per step over ``2 T - 1`` timesteps that repeat values, and both calls of a step
  get the same decision (the PAG interval is read over the ``T`` steps).
- A pipeline sharing the patched denoiser (``from_pipe``, or built from the same components) is guided with its
  own CFG flag, timesteps and rows (never the patched pipeline's), also after the patched pipeline is gone; a
  direct denoiser call before any pipeline call raises a clear error instead of an AttributeError.
"""

from __future__ import annotations

import gc

import pytest
import torch
from diffusers import (
    DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler,
    StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, UniPCMultistepScheduler,
)

import headpag
from support import models as M
from support.checks import guided, patched, recorded_rows
from support.tolerances import close

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              # diffusers' k-diffusion schedulers build numpy arrays from tensors (numpy 2 deprecation, not ours)
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# T = 4 steps, interval (0.5, 1): steps 2 and 3 guided. Rows of the guided layer per denoiser call, CFG with one
# prompt: 2 (uncond, cond) unguided, 3 (plus the twin) guided.
FIRST_ORDER = [2, 2, 3, 3]
SECOND_ORDER = [2, 2, 2, 2, 3, 3, 3]  # steps 0, 0, 1, 1, 2, 2, 3 (Heun's last step is a single call)
UNET_SCHEDULERS = {
    "DDIM": (lambda: DDIMScheduler(clip_sample=False, steps_offset=1, set_alpha_to_one=False), FIRST_ORDER),
    "Euler": (lambda: EulerDiscreteScheduler(steps_offset=1), FIRST_ORDER),
    "EulerAncestral": (lambda: EulerAncestralDiscreteScheduler(steps_offset=1), FIRST_ORDER),
    "DPMSolverMultistep": (lambda: DPMSolverMultistepScheduler(steps_offset=1), FIRST_ORDER),
    "UniPCMultistep": (lambda: UniPCMultistepScheduler(steps_offset=1), FIRST_ORDER),
    "LMSDiscrete": (lambda: LMSDiscreteScheduler(steps_offset=1), FIRST_ORDER),
    "Heun": (lambda: HeunDiscreteScheduler(steps_offset=1), SECOND_ORDER),
    "KDPM2": (lambda: KDPM2DiscreteScheduler(steps_offset=1), SECOND_ORDER),
    "KDPM2Ancestral": (lambda: KDPM2AncestralDiscreteScheduler(steps_offset=1), SECOND_ORDER),
}


def _mid(pipe):
    return {"mid": pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1}


def _mid_heads(pipe) -> str:
    return ",".join(f"{x.index}:*" for x in headpag.list_layers(pipe) if x.name.startswith("mid_block"))


@pytest.mark.parametrize("name", list(UNET_SCHEDULERS))
def test_the_interval_counts_the_pipelines_steps(name):
    make, expected = UNET_SCHEDULERS[name]
    pipe = M.sd15(scheduler=make())
    inputs = M.sd15_inputs(steps=4)
    with recorded_rows(_mid(pipe)) as log, patched(pipe, "fused", _mid_heads(pipe), scale=3.0, interval=(0.5, 1.0)):
        M.run(pipe, inputs)
    assert log["mid"] == expected


def test_pndm_counts_its_warmup_calls_as_steps():
    """PNDM (PLMS) runs one call per entry of its timesteps (T + 1 entries, the first one repeated): it has no
    second-order step to pair, so each call is read by its timestep, and the last half of the schedule is guided."""
    pipe = M.sd15(scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1))
    with recorded_rows(_mid(pipe)) as log, patched(pipe, "fused", _mid_heads(pipe), scale=3.0, interval=(0.5, 1.0)):
        M.run(pipe, M.sd15_inputs(steps=4))
    assert log["mid"][-2:] == [3, 3] and log["mid"][:2] == [2, 2]


@pytest.mark.parametrize("scheduler, expected", [(FlowMatchEulerDiscreteScheduler, FIRST_ORDER),
                                                 (FlowMatchHeunDiscreteScheduler, SECOND_ORDER)],
                         ids=["FlowMatchEuler", "FlowMatchHeun"])
def test_the_interval_counts_the_steps_of_flow_matching_schedulers(scheduler, expected):
    pipe = M.sd3()
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    block = {"block1": pipe.transformer.transformer_blocks[1].attn}
    with recorded_rows(block) as log, patched(pipe, "fused", "1:0", scale=3.0, interval=(0.5, 1.0)):
        M.run(pipe, M.sd3_inputs(steps=4))
    assert log["block1"] == expected


def test_heun_fused_equals_eager():
    pipe = M.sd15(scheduler=HeunDiscreteScheduler(steps_offset=1))
    inputs = M.sd15_inputs(steps=3, batch=2)
    heads = _mid_heads(pipe)
    close(guided(pipe, "fused", heads, inputs, scale=3.0), guided(pipe, "eager", heads, inputs, scale=3.0), "fp32")


# --- pipelines sharing the patched denoiser -------------------------------------------------------------------------


@pytest.mark.parametrize("execution", ["fused", "eager"])
def test_a_sibling_pipeline_is_guided_with_its_own_state(execution):
    """The patched pipeline runs at CFG 5 with 1 prompt; its from_pipe sibling at CFG 1 with 2 prompts (read as
    [uncond, cond] with the patched pipeline's CFG flag, its rows would mix): the
    sibling's output equals that of a pipeline patched directly (same components, its own settings), and the
    patched pipeline's own output is unchanged by the sibling's calls."""
    pipe = M.sd15()
    sibling = StableDiffusionPipeline.from_pipe(pipe)
    heads = _mid_heads(pipe)
    own, sibling_inputs = M.sd15_inputs(batch=1, cfg=5.0), M.sd15_inputs(batch=2, cfg=1.0, seed=3)
    expected_sibling = guided(sibling, execution, heads, sibling_inputs, scale=3.0)
    expected_own = guided(pipe, execution, heads, own, scale=3.0)
    with patched(pipe, execution, heads, scale=3.0):
        assert torch.equal(M.run(pipe, own), expected_own)
        assert torch.equal(M.run(sibling, sibling_inputs), expected_sibling)
        assert torch.equal(M.run(pipe, own), expected_own)


def test_a_sibling_of_another_class_reads_its_own_call_pattern():
    """An img2img sibling (from_pipe) of a patched text-to-image pipeline: its rows and its strength-trimmed steps."""
    pipe = M.sd15()
    sibling = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    inputs = M.sd15_inputs(batch=2, cfg=5.0) | dict(image=torch.rand(2, 3, 16, 16), strength=1.0)
    heads = _mid_heads(pipe)
    expected = guided(sibling, "fused", heads, inputs, scale=3.0)
    with patched(pipe, "fused", heads, scale=3.0):
        assert torch.equal(M.run(sibling, inputs), expected)


def test_the_sibling_keeps_working_after_the_patched_pipeline_is_gone():
    pipe = M.sd15()
    sibling = StableDiffusionPipeline.from_pipe(pipe)
    heads = _mid_heads(pipe)
    inputs = M.sd15_inputs(batch=1, cfg=5.0)
    expected = guided(sibling, "fused", heads, inputs, scale=3.0)
    headpag.enable_fused(pipe, heads, scale=3.0)
    del pipe
    gc.collect()
    try:
        assert torch.equal(M.run(sibling, inputs), expected)
    finally:
        headpag.disable(sibling)
    assert not headpag.is_enabled(sibling)


def test_a_direct_denoiser_call_before_any_pipeline_call_raises_clearly():
    pipe = M.sd15()
    with patched(pipe, "fused", _mid_heads(pipe), scale=3.0):
        pipe.scheduler.set_timesteps(2)
        sample = torch.randn(1, 4, 2, 2)
        with pytest.raises(RuntimeError, match="was called outside a pipeline call, and the pipeline holds no state"):
            pipe.unet(sample, pipe.scheduler.timesteps[0], encoder_hidden_states=torch.randn(1, 4, 12))
