"""The image-conditioned variants of the SD / SDXL / SD3 families and Kolors (tests/support/models_variants.py):
their layer tables, parity with diffusers' own PAG pipeline for each variant, fused == eager with guidance, restore
and ``scale=0``, CFG on and off, 2 prompts x 2 images each.

diffusers' UNet PAG (``PAGCFGIdentitySelfAttnProcessor2_0`` / ``PAGIdentitySelfAttnProcessor2_0``) replaces the
whole attention of a layer by its values (the identity map): every head ``"i:*"`` with ``u = 1``, either mode (a
UNet layer has no text tokens). SD3's ``PAGJointAttnProcessor2_0`` perturbs the image-image block only:
``mode="image"``. Layers are selected in diffusers by ``pag_applied_layers`` (regexes searched in the names of the
self-attention modules), here by the layer indices of the same modules.
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers.models.attention_processor import Attention

import headpag
from support import models as M
from support import models_variants as V
from support.checks import ENABLE, MIN_EFFECT, check_fused_eager_restore, check_layer_table, close, effect, guided

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# name: (factory overrides, layout, heads of the fused/eager check, mode)
CASES = {
    "sd_img2img": ({}, V.SD_LAYOUT, "1:2,3:0@0.5", "joint"),
    "sd_inpaint": ({}, V.SD_LAYOUT, "2:1,5:*", "joint"),
    "sd_inpaint-4ch": (dict(in_channels=4), V.SD_LAYOUT, "0:3,2:0@0.5", "joint"),  # the blend-back path
    "sdxl_img2img": ({}, V.SDXL_LAYOUT, "2:1,5:3@0.5", "joint"),
    "sdxl_inpaint": ({}, V.SDXL_LAYOUT, "0:0,7:2", "joint"),
    "sdxl_inpaint-4ch": (dict(in_channels=4), V.SDXL_LAYOUT, "3:1,3:3@0.5", "joint"),
    "sd_controlnet_inpaint": ({}, V.SD_LAYOUT, "2:0,4:1@0.5", "joint"),
    "sdxl_controlnet_img2img": ({}, V.SDXL_LAYOUT, "1:2,6:0", "joint"),
    "sd3_img2img": ({}, V.SD3_LAYOUT, "0:1,2:3@0.5", "image"),
    "sd3_inpaint": ({}, V.SD3_LAYOUT, "1:0,2:2@0.5", "image"),  # 33 input channels: mask and masked image per row
    "sd3_inpaint-16ch": (dict(in_channels=16), V.SD3_LAYOUT, "1:0,1:2@0.5", "joint"),  # the blend-back path
    "kolors": ({}, V.SDXL_LAYOUT, "3:1,4:0@0.5", "joint"),
    "kolors_img2img": ({}, V.SDXL_LAYOUT, "1:3,7:*", "joint"),
}

# name: diffusers' pag_applied_layers for the parity test
PAG_LAYERS = {
    "sd_img2img": ["mid"],
    "sd_inpaint": [r"down_blocks\.0"],  # forks at the first unit: every unit carries the twins
    "sd_inpaint-4ch": ["mid"],
    "sdxl_img2img": [r"up_blocks\.0"],  # four layers in the first up block
    "sdxl_inpaint": ["mid"],
    "sd_controlnet_inpaint": ["mid"],  # the ControlNet's mid residual reaches the forked mid block
    "sdxl_controlnet_img2img": [r"down_blocks\.1"],  # and its down residuals the forked down block
    "sd3_img2img": [r"blocks\.0\.attn$", r"blocks\.2\.attn$"],
    "kolors": [r"down_blocks\.1\.attentions\.0\.transformer_blocks\.1"],  # one layer of a Transformer2DModel
}


def _variant(case: str) -> str:
    return case.split("-")[0]


def _make(case: str, **kw):
    return V.make(_variant(case), CASES[case][0], **kw)


@pytest.fixture(scope="module")
def pipes():
    """One pipeline per case, built on first use."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = V.VARIANTS[_variant(case)].build(**CASES[case][0])
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_layer_table(case, pipes):
    """The index space, heads, head dims, kind and fork units, and the order in which one denoiser call of the
    pipeline really runs the self-/joint-attention modules (found by name, independently of list_layers)."""
    pipe = pipes(case)
    check_layer_table(pipe, *CASES[case][1], run=lambda: M.run(
        pipe, V.inputs(_variant(case), pipe, batch=1, num_images_per_prompt=1, steps=1, strength=1.0)))


def _diffusers_selection(pipe, pag_layers: list[str]) -> list[str]:
    """The modules diffusers' ``PAGMixin._set_pag_attn_processor`` picks for ``pag_layers`` (self-attention modules
    whose name a pattern is found in)."""
    return sorted({name for name, m in M.denoiser(pipe).named_modules()
                   if isinstance(m, Attention) and not m.is_cross_attention
                   for pattern in pag_layers if re.search(pattern, name)})


def _peer_run(pipe, variant: V.Variant, pag_layers: list[str], inputs: dict) -> torch.Tensor:
    """The output of diffusers' PAG peer of ``pipe`` (sharing its components). The shared denoiser's processors
    are put back afterwards: ``StableDiffusionXLPAGInpaintPipeline`` returns ``output_type="latent"`` before
    restoring them (diffusers 0.42.1), leaving its PAG processors on the UNet."""
    den = M.denoiser(pipe)
    processors = den.attn_processors
    try:
        return M.run(M.peer(pipe, variant.peer, pag_applied_layers=pag_layers, **variant.peer_kwargs), inputs)
    finally:
        den.set_attn_processor(processors)


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("case", list(PAG_LAYERS))
def test_matches_diffusers_pag_pipeline(case, cfg, pipes):
    """Every head of the layers diffusers' PAG peer perturbs, ``u = 1``, PAG scale 3, 2 prompts x 2 images."""
    pipe = pipes(case)
    variant = V.VARIANTS[_variant(case)]
    inputs = V.inputs(_variant(case), pipe, cfg=cfg)
    plain = M.run(pipe, inputs)
    expected = _peer_run(pipe, variant, PAG_LAYERS[case], {**inputs, "pag_scale": 3.0})
    assert expected.shape[0] == 4 and effect(expected, plain) > MIN_EFFECT

    selected = [x for x in headpag.list_layers(pipe) if x.name in _diffusers_selection(pipe, PAG_LAYERS[case])]
    assert sorted(x.name for x in selected) == _diffusers_selection(pipe, PAG_LAYERS[case])
    heads = ",".join(f"{x.index}:*" for x in selected)
    mode = CASES[case][3]
    for execution in ENABLE:
        out = guided(pipe, execution, heads, inputs, scale=3.0, u=1, mode=mode)
        close(out, expected, "peer", f"{case} {execution}, guidance_scale={cfg}")
    assert torch.equal(M.run(pipe, inputs), plain)


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_eager_restore(case, cfg, pipes):
    """Head-level selections (partial u too): fused == eager, guidance changes the output, disable and scale=0
    give the plain pipeline bit for bit."""
    pipe = pipes(case)
    inputs = V.inputs(_variant(case), pipe, cfg=cfg)
    _, _, heads, mode = CASES[case]
    check_fused_eager_restore(pipe, inputs, heads, scale=3.0, mode=mode)


@pytest.mark.parametrize("variant", [v for v in V.VARIANTS if V.VARIANTS[v].peer is not None])
def test_diffusers_pag_pipelines_are_refused(variant, pipes):
    """diffusers' PAG pipelines make their own perturbed rows ([uncond, cond, perturbed]): they are not subclasses
    of the variants registered here, so headpag refuses them before attaching anything, naming the known ones."""
    base = pipes(variant)
    spec = V.VARIANTS[variant]
    pag = M.peer(base, spec.peer, pag_applied_layers=["mid"], **spec.peer_kwargs)
    with pytest.raises(TypeError, match=rf"unsupported pipeline {spec.peer.__name__}: headpag knows .*"
                                        rf"\b{type(base).__name__}\b.*register_pipeline"):
        headpag.enable_fused(pag, "0:0")
    assert not headpag.is_enabled(pag)
    assert not hasattr(M.denoiser(pag), "_diffusers_hook")
