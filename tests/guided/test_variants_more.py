"""More variants of existing families (tests/support/models_variants_more.py): SD ControlNet img2img, SDXL ControlNet
inpaint (9- and 4-channel UNets), SD3 ControlNet, HunyuanDiT ControlNet, Qwen-Image edit-inpaint and ControlNet.

Per pipeline: its registered call pattern, the layer table and the order one denoiser call runs the layers, that the
ControlNet's residuals reach the denoiser (else the per-row residual arguments would go untested), fused == eager
with guidance, ``disable`` and ``scale=0`` bit-exact, CFG on and off, 2 prompts x 2 images each. diffusers has no
PAG pipeline for any of these variants (diffusers 0.42.1: its PAG ControlNet pipelines are SD text-to-image / inpaint
and SDXL text-to-image / img2img only), so there is no parity test here.
"""

from __future__ import annotations

import pytest
import torch

from headpag.archs import call_pattern_of
from support import models as M
from support import models_variants as V
from support import models_variants_more as X
from support.checks import ENABLE, MIN_EFFECT, check_fused_eager_restore, check_layer_table, close, effect, patched

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# case: (factory overrides, layout, heads of the fused/eager check, mode)
CASES = {
    "sd_controlnet_img2img": ({}, V.SD_LAYOUT, "2:0,4:1@0.5", "joint"),  # the ControlNet's mid residual at the fork
    "sd_controlnet_img2img-down": ({}, V.SD_LAYOUT, "0:3,5:*@0.7", "joint"),  # fork at the first unit
    "sdxl_controlnet_inpaint": ({}, V.SDXL_LAYOUT, "1:2,6:0", "joint"),  # down residuals into the forked down block
    "sdxl_controlnet_inpaint-4ch": (dict(in_channels=4), V.SDXL_LAYOUT, "3:1,5:3@0.5", "joint"),  # blend-back path
    "sd3_controlnet": ({}, V.SD3_LAYOUT, "0:1,2:3@0.5", "image"),
    "sd3_controlnet-joint": ({}, V.SD3_LAYOUT, "1:0,1:2@0.5", "joint"),  # residuals added before and after the fork
    "hunyuandit_controlnet": ({}, V.HUNYUAN_LAYOUT, "1:0,4:1@0.5", "joint"),  # residual + skip into forked block 4
    "hunyuandit_controlnet-last": ({}, V.HUNYUAN_LAYOUT, "5:*@0.7", "joint"),  # both residuals' blocks; one forked
    "qwen_edit_inpaint": ({}, V.QWEN_LAYOUT, "1:0,2:3@0.5", "image"),  # reference tokens appended to the image's
    "qwen_edit_inpaint-joint": ({}, V.QWEN_LAYOUT, "0:2,2:*@0.5", "joint"),
    "qwen_controlnet": ({}, V.QWEN_LAYOUT, "1:0,2:3@0.5", "image"),
    "qwen_controlnet-joint": ({}, V.QWEN_LAYOUT, "0:1,1:3@0.5", "joint"),
}

# variant: (pipeline class name, pattern name, cfg_off)
PATTERNS = {
    "sd_controlnet_img2img": ("StableDiffusionControlNetImg2ImgPipeline", "uncond_cond", {"guidance_scale": 1.0}),
    "sdxl_controlnet_inpaint": ("StableDiffusionXLControlNetInpaintPipeline", "uncond_cond", {"guidance_scale": 1.0}),
    "sd3_controlnet": ("StableDiffusion3ControlNetPipeline", "uncond_cond", {"guidance_scale": 1.0}),
    "hunyuandit_controlnet": ("HunyuanDiTControlNetPipeline", "uncond_cond", {"guidance_scale": 1.0}),
    "qwen_edit_inpaint": ("QwenImageEditInpaintPipeline", "separate", {"true_cfg_scale": 1.0}),
    "qwen_controlnet": ("QwenImageControlNetPipeline", "separate", {"true_cfg_scale": 1.0}),
}


def _variant(case: str) -> str:
    return case.split("-")[0]


def _inputs(case: str, cfg: bool = True, **kw) -> dict:
    variant = _variant(case)
    if variant.startswith("qwen"):
        kw.setdefault("true_cfg_scale", 4.0 if cfg else 1.0)
    else:
        kw.setdefault("cfg", 5.0 if cfg else 1.0)
    return X.VARIANTS[variant][1](**kw)


@pytest.fixture(scope="module")
def pipes():
    """One pipeline per case, built on first use; the Qwen edit pipeline's image resize scaled down throughout."""
    cache = {}

    def get(case):
        key = (_variant(case), tuple(sorted(CASES[case][0].items())))
        if key not in cache:
            cache[key] = X.VARIANTS[_variant(case)][0](**CASES[case][0])
        return cache[key]

    with X.small_images():
        yield get


@pytest.mark.parametrize("variant", list(PATTERNS))
def test_registered_pattern(variant, pipes):
    pipe = pipes(variant)
    name, pattern, cfg_off = PATTERNS[variant]
    assert type(pipe).__name__ == name
    registered = call_pattern_of(pipe)
    assert registered.name == pattern and dict(registered.cfg_off) == cfg_off


@pytest.mark.parametrize("case", [c for c in CASES if "-" not in c or c.endswith("-4ch")])
def test_layer_table(case, pipes):
    """Index space, heads, head dims, kind and fork units, and the order in which one denoiser call of the pipeline
    really runs the self-/joint-attention modules (found by name, independently of list_layers)."""
    pipe = pipes(case)
    # 2 steps: the image-conditioned ones run the last one or two of them
    check_layer_table(pipe, *CASES[case][1], run=lambda: M.run(pipe, _inputs(case, cfg=False, steps=2, **_one(case))))


def _one(case: str) -> dict:
    """One prompt, one image."""
    if _variant(case).startswith("qwen"):
        return dict(prompts=1, images_per_prompt=1)
    return dict(batch=1, num_images_per_prompt=1)


CONTROL_SCALE_OFF = {"sd_controlnet_img2img": 0.0, "sdxl_controlnet_inpaint": 0.0, "sd3_controlnet": 0.0,
                     "hunyuandit_controlnet": 0.0, "qwen_controlnet": 0.0}


@pytest.mark.parametrize("variant", list(CONTROL_SCALE_OFF))
def test_control_reaches_the_denoiser(variant, pipes):
    """The tiny ControlNets' residuals are not zero: switching them off changes the output."""
    pipe = pipes(variant)
    inputs = _inputs(variant)
    off = M.run(pipe, {**inputs, "controlnet_conditioning_scale": CONTROL_SCALE_OFF[variant]})
    assert effect(M.run(pipe, inputs), off) > MIN_EFFECT


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_eager_restore(case, cfg, pipes):
    """Head-level selections (partial u too), 2 prompts x 2 images: fused == eager, guidance changes the output,
    disable and scale=0 give the plain pipeline bit for bit."""
    pipe = pipes(case)
    inputs = _inputs(case, cfg=cfg)
    _, _, heads, mode = CASES[case]
    check_fused_eager_restore(pipe, inputs, heads, scale=3.0, mode=mode)
    assert M.run(pipe, inputs).shape[0] == 4


@pytest.mark.parametrize("variant", ["sdxl_controlnet_inpaint", "hunyuandit_controlnet"])
def test_guidance_rescale_measures_the_unperturbed_cond(variant, pipes):
    """``guidance_rescale > 0`` is applied against the unperturbed cond prediction (diffusers' PAG semantics):
    every rescale_noise_cfg call of a guided step gets the cond rows as the denoiser returned them before the fold,
    fused and eager agree, and the rescale changes the output. StableDiffusionXLControlNetInpaintPipeline keeps
    guidance_rescale in a local of ``__call__`` only, HunyuanDiT's ControlNet pipeline as ``pipe.guidance_rescale``."""
    from headpag.guided import rescale

    pipe = pipes(variant)
    inputs = _inputs(variant, steps=2)
    plain = M.run(pipe, inputs)
    seen = []
    unmoved = rescale.CondRecord.unmoved

    def spy(self, noise_pred_text):
        cond = unmoved(self, noise_pred_text)
        seen.append(cond is not None)
        return cond

    outputs = {}
    rescale.CondRecord.unmoved = spy
    try:
        for execution in ENABLE:
            with patched(pipe, execution, "2:0", scale=3.0):
                outputs[execution] = M.run(pipe, {**inputs, "guidance_rescale": 0.7})
                no_rescale = M.run(pipe, inputs)
    finally:
        rescale.CondRecord.unmoved = unmoved
    assert len(seen) >= 2 and all(seen)  # every rescale call of both executions (strength may trim the steps)
    close(outputs["fused"], outputs["eager"], "families")
    assert effect(outputs["fused"], no_rescale) > MIN_EFFECT
    assert torch.equal(M.run(pipe, inputs), plain)
