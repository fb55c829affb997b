"""Chroma (ChromaTransformer2DModel; ChromaPipeline, ChromaImg2ImgPipeline, ChromaInpaintPipeline).

Chroma's pipelines pass a text padding mask on every denoiser call (diffusers 0.42 builds it as float 0 / 1, which
SDPA adds to the scores); the perturbed attention takes it as SDPA does. Prompts here are padded, and differently
per prompt (``PADDED``). Oracles: the identity (joint) and a text-first SDPA under the call's mask (image) as
independent perturbed passes, the eager implementation and the unpatched pipeline; CFG's
uncond call (not named by a cache_context) must only get the cond call's delta: for one flow-matching Euler step,
guided - plain does not depend on the CFG scale."""

from __future__ import annotations

import pytest
import torch
from diffusers import ChromaTransformer2DModel

import headpag
from support import models as M
from support import models_flux_family as F
from support.checks import check_fused_eager_restore, effect, guided, recorded_rows
from support.reference import check_matches_reference, module_pass, sdpa_perturbed_copy
from support.tolerances import MIN_EFFECT, close

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")]  # Chroma's own import

PIPELINES = {
    "text2img": (F.chroma, F.chroma_inputs),
    "img2img": (F.chroma_img2img, F.chroma_img2img_inputs),
    "inpaint": (F.chroma_inpaint, F.chroma_inpaint_inputs),
}
HEADS = "0:1,2:0@0.5"  # layer 0 is the double block, 1 and 2 the single blocks
PADDED = (4, 2)  # valid tokens of each prompt's TEXT_LEN: padding masked differently per row
_PIPES: dict = {}


def pipe_of(name: str):
    if name not in _PIPES:
        _PIPES[name] = PIPELINES[name][0]()
    return _PIPES[name]


def inputs_of(name: str, *, cfg: bool = True, **kw) -> dict:
    if name in ("img2img", "inpaint") and kw.get("steps") == 1:
        kw.setdefault("strength", 1.0)
    if kw.get("prompts", 2) == 2:
        kw.setdefault("valid", PADDED)
    return PIPELINES[name][1](cfg=4.0 if cfg else 1.0, **kw)


def test_layers():
    expected = [("transformer_blocks.0.attn", "transformer_blocks.0"),
                ("single_transformer_blocks.0.attn", "single_transformer_blocks.0"),
                ("single_transformer_blocks.1.attn", "single_transformer_blocks.1")]
    for name in PIPELINES:
        pipe = pipe_of(name)
        layers = headpag.list_layers(pipe)
        assert [(x.name, x.fork_unit) for x in layers] == expected
        assert [(x.index, x.heads, x.head_dim, x.kind) for x in layers] == [(i, 2, 16, "joint") for i in range(3)]
        pattern = headpag.archs.call_pattern_of(pipe)
        assert (pattern.name, dict(pattern.cfg_off)) == ("separate_calls", {"guidance_scale": 1.0})


def test_real_checkpoint_layers():
    """The model's config defaults (lodestones/Chroma1-HD): 19 double + 38 single blocks of 24 heads of 128."""
    with torch.device("meta"):
        model = ChromaTransformer2DModel()
    layers = headpag.list_layers(model)
    assert len(layers) == 57 and {(x.heads, x.head_dim) for x in layers} == {(24, 128)}
    assert layers[19].name == "single_transformer_blocks.0.attn"


@pytest.mark.parametrize("name", list(PIPELINES))
def test_mask_on_every_call(name):
    """Every denoiser call (cond and uncond) gets the text padding mask over text + image tokens, and the padding
    matters: the output with padded prompts differs from the one with every token valid."""
    pipe = pipe_of(name)
    masks = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kw: masks.append(kw["attention_mask"]), with_kwargs=True)
    try:
        padded = M.run(pipe, inputs_of(name))
    finally:
        handle.remove()
    assert len(masks) == 6  # 3 steps x (cond, uncond)
    n_tokens = F.TEXT_LEN + (F.SIZE // 4) ** 2
    assert all(m is not None and m.shape == (2, n_tokens) for m in masks)
    assert [int(n) for n in masks[0][:, :F.TEXT_LEN].sum(dim=1)] == list(PADDED)
    assert effect(M.run(pipe, inputs_of(name, valid=F.TEXT_LEN)), padded) > MIN_EFFECT


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("heads, block", [("0:*", "transformer_blocks.0"), ("2:*", "single_transformer_blocks.1")])
def test_padded_prompts_match_an_independent_perturbed_pass(heads, block, cfg, mode):
    """Every head of one layer with u=1 under padded prompts equals the reference fold of the identity (joint: the
    values, as diffusers' PAG processors return them; diffusers' apply_layer_skip cannot hook FluxAttention) or of a
    text-first SDPA under the call's own mask (image) on that block: the mask reaches the perturbed attention as
    SDPA takes it (the twins carry their rows' masks), the uncond call gets the cond call's delta."""
    pipe = pipe_of("text2img")
    perturbed = sdpa_perturbed_copy(pipe, f"{block}.attn", mode, n_text=F.TEXT_LEN, text="first")
    check_matches_reference(pipe, inputs_of("text2img", cfg=cfg), heads, module_pass(perturbed),
                            scale=2.0, cfg=cfg, calls="separate", mode=mode, kind="fp32")


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("name", list(PIPELINES))
def test_fused_eager_restore(name, cfg, mode):
    check_fused_eager_restore(pipe_of(name), inputs_of(name, cfg=cfg), HEADS, mode=mode)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_two_prompts_two_images(name):
    check_fused_eager_restore(pipe_of(name), inputs_of(name, prompts=2, images_per_prompt=2), "1:*,2:1", mode="image")


@pytest.mark.parametrize("name", list(PIPELINES))
def test_uncond_call_gets_the_cond_delta(name):
    """One step: guided - plain is the same with CFG on (4.0) and off."""
    shifts = {}
    pipe = pipe_of(name)
    for cfg in (True, False):
        inputs = inputs_of(name, cfg=cfg, steps=1)
        shifts[cfg] = guided(pipe, "fused", HEADS, inputs) - M.run(pipe, inputs)
    assert effect(shifts[False], torch.zeros_like(shifts[False])) > MIN_EFFECT
    close(shifts[True], shifts[False], "families")


def test_counts_calls():
    """With CFG each step makes a cond call carrying the twins and an uncond call without them; the single
    blocks (on the joined text + image sequence) see the same rows."""
    pipe = pipe_of("text2img")
    # the rows each block computes: its norms run inside headpag's unit hook
    units = {"double": pipe.transformer.transformer_blocks[0].norm1,
             "single": pipe.transformer.single_transformer_blocks[1].norm}
    with recorded_rows(units) as log:
        with headpag.fused(pipe, "1:0"):
            M.run(pipe, inputs_of("text2img", prompts=1, steps=2))
            M.run(pipe, inputs_of("text2img", cfg=False, prompts=1, steps=2))
    # the double block runs before the fork (layer 1 is single block 0): base rows only
    assert log == {"double": [1, 1, 1, 1, 1, 1], "single": [2, 1, 2, 1, 2, 2]}


@pytest.mark.parametrize("mode", ["joint", "image"])
def test_text_tokens_first(mode):
    """The layers are told n_text = the prompt length and text first: the double block's joint attention starts with
    the text stream's values, and the single blocks run on cat([text stream, image stream]) of the double block."""
    pipe = pipe_of("text2img")
    block, single = pipe.transformer.transformer_blocks[0], pipe.transformer.single_transformer_blocks[0]
    seen = {}  # first call's (the cond call's) double-block output and single-block input

    def double_out(module, args, kwargs, out):
        seen.setdefault("double", out)

    def single_in(module, args, kwargs):
        seen.setdefault("single", kwargs["hidden_states"])

    handles = [block.register_forward_hook(double_out, with_kwargs=True),
               single.register_forward_pre_hook(single_in, with_kwargs=True)]
    handle, text = F.text_values(block.attn)
    handles.append(handle)
    try:
        with F.routed_calls() as calls, headpag.fused(pipe, "0:0,1:1", mode=mode):
            M.run(pipe, inputs_of("text2img", prompts=1, steps=1))
    finally:
        for h in handles:
            h.remove()
    n_image = (F.SIZE // 4) ** 2
    assert [c["layer"] for c in calls] == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    for c in calls:
        assert (c["n_text"], c["text_first"], c["v"].shape[:2]) == (F.TEXT_LEN, True, (2, F.TEXT_LEN + n_image))
    assert torch.equal(calls[0]["v"][:, :F.TEXT_LEN], text[0])
    text_stream, image_stream = seen["double"]
    assert torch.equal(seen["single"], torch.cat([text_stream, image_stream], dim=1))
