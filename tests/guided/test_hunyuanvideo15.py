"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``; ``HunyuanVideo15Pipeline``, ``...ImageToVideoPipeline``).

Double-stream blocks whose joint attention puts the text span LAST (``[video, image-condition + ByT5 + Qwen
tokens]``) under a query x key text-padding mask; the pipelines' loop is diffusers' ``ClassifierFreeGuidance``
guider (a cond call under ``cache_context("pred_cond")``, then, with CFG, an uncond call under ``"pred_uncond"``).
Prompts are padded differently per row. Oracles: the eager implementation; reference folds whose perturbed pass is
diffusers' own identity attention (``AttentionProcessorSkipHook(skip_attention_scores=True)``, the hook
``apply_layer_skip`` attaches, which itself does not know this processor) for ``mode="joint"``, and a text-LAST SDPA
under the call's own mask for ``mode="image"``; the unpatched pipeline for ``scale=0`` / after disable.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.guiders import ClassifierFreeZeroStarGuidance
from diffusers.hooks import HookRegistry
from diffusers.hooks.layer_skip import AttentionProcessorSkipHook
from diffusers.models.attention_processor import AttnProcessor2_0

import headpag
from headpag.archs import call_pattern_of
from headpag.archs.hunyuanvideo15 import GUIDER_CALLS, HUNYUANVIDEO15
from support import models_hunyuanvideo15 as H
from support.checks import check_fused_eager_restore, effect, forward_order, guided, recorded_rows
from support.models_flux_family import routed_calls, text_values
from support.reference import check_matches_reference, module_pass, sdpa_perturbed_copy
from support.tolerances import MIN_EFFECT, close

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS = "0:1,1:0@0.5"  # a fork at block 0, a soft head in block 1


@pytest.fixture(scope="module")
def pipes():
    return {"t2v": H.t2v(), "i2v": H.i2v()}


@contextlib.contextmanager
def guider_of(pipe, guider):
    """``pipe.guider`` replaced by ``guider`` inside the block."""
    saved = pipe.guider
    pipe.guider = guider
    try:
        yield pipe
    finally:
        pipe.guider = saved


def direct_call(timestep: torch.Tensor) -> tuple[tuple, dict]:
    """Arguments of a one-row denoiser call made outside the pipeline (2 latent frames of 4x4, 3 image tokens)."""
    args = (torch.randn(1, 2 * H.Z_DIM + 1, 2, 4, 4), timestep, torch.randn(1, H.TEXT_LEN, H.TEXT_DIM),
            torch.ones(1, H.TEXT_LEN))
    kwargs = dict(encoder_hidden_states_2=torch.randn(1, H.TEXT_2_LEN, H.TEXT_2_DIM),
                  encoder_attention_mask_2=torch.ones(1, H.TEXT_2_LEN), image_embeds=torch.zeros(1, 3, H.IMAGE_DIM))
    return args, kwargs


# --- layers --------------------------------------------------------------------------------------------------------


def test_list_layers():
    """The double-stream blocks' attention, in forward order; the token refiner's attention is not a layer."""
    model = H.transformer(num_layers=3)
    layers = headpag.list_layers(model)
    assert [(x.index, x.name, x.heads, x.head_dim, x.kind, x.fork_unit) for x in layers] == [
        (i, f"transformer_blocks.{i}.attn", H.HEADS, H.HEAD_DIM, "joint", f"transformer_blocks.{i}") for i in range(3)]
    assert headpag.forward_units(model) == [f"transformer_blocks.{i}" for i in range(3)]
    assert {type(model.get_submodule(x.name).processor).__name__ for x in layers} == set(HUNYUANVIDEO15.processors)
    refiner = [n for n, m in model.named_modules() if n.startswith("context_embedder") and hasattr(m, "processor")]
    assert refiner and not set(refiner) & {x.name for x in layers}
    args, kwargs = direct_call(torch.tensor([500.0]))
    calls = forward_order({x.name: model.get_submodule(x.name) for x in layers}, lambda: model(*args, **kwargs))
    assert calls == [x.name for x in layers]


def test_real_checkpoint_layers():
    """480p / 720p, t2v / i2v, distilled or not (diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py
    TRANSFORMER_CONFIGS; the class defaults): 54 blocks of 16 heads of 128, on the meta device."""
    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel(in_channels=65, out_channels=32, num_attention_heads=16,
                                                 attention_head_dim=128, num_layers=54, num_refiner_layers=2)
    layers = headpag.list_layers(model)
    assert len(layers) == 54 and {(x.heads, x.head_dim, x.kind) for x in layers} == {(16, 128, "joint")}


def test_call_pattern(pipes):
    for pipe in pipes.values():
        pattern = call_pattern_of(pipe)
        assert pattern is GUIDER_CALLS and (pattern.name, dict(pattern.cfg_off)) == ("guider", {})


# --- fused == eager == restored ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("cfg", [6.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_fused_eager_restore(pipes, kind, cfg, mode):
    pipe = pipes[kind]
    check_fused_eager_restore(pipe, H.inputs(pipe, cfg=cfg), HEADS, run=H.run, mode=mode)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_two_prompts_two_videos(pipes, kind):
    pipe = pipes[kind]
    check_fused_eager_restore(pipe, H.inputs(pipe, batch=2, videos_per_prompt=2), "1:*,0:0@0.5", run=H.run,
                              mode="image")


# --- the loop: the guider's calls, the PAG interval -----------------------------------------------------------------


@contextlib.contextmanager
def call_log(pipe):
    """Logs, in order, each ``cache_context`` the loop opens on the transformer and the rows each call runs through
    ``transformer_blocks[0]`` and ``[1]`` (as ``(rows of block 0, rows of block 1)``)."""
    transformer, events, rows = pipe.transformer, [], {}
    original = transformer.cache_context

    @contextlib.contextmanager
    def logged(name, **kwargs):
        events.append(name)
        with original(name, **kwargs):
            yield

    transformer.cache_context = logged
    blocks = {i: transformer.transformer_blocks[i].norm1 for i in range(2)}  # inside headpag's unit hook
    try:
        with recorded_rows(blocks) as rows:
            yield events, rows
    finally:
        del transformer.cache_context
    events[:] = [e for pair in zip(events, zip(rows[0], rows[1])) for e in pair]


@pytest.mark.parametrize("interval, guided_steps", [((0.0, 1.0), {0, 1, 2, 3}), ((0.0, 0.5), {0, 1}),
                                                    ((0.5, 1.0), {2, 3})], ids=["all", "first-half", "second-half"])
@pytest.mark.parametrize("cfg", [6.0, 1.0], ids=["cfg", "no-cfg"])
def test_calls_rows_and_interval(pipes, cfg, interval, guided_steps):
    """Each step: the cond call under "pred_cond" carries one twin per row from the fork (block 1) on, on the steps
    of the interval only (the step read from the scheduler timestep the pipeline passes as is); with CFG the uncond
    call under "pred_uncond" follows, without twins."""
    pipe = pipes["t2v"]
    with call_log(pipe) as (events, _), headpag.fused(pipe, "1:0", interval=interval):
        H.run(pipe, H.inputs(pipe, batch=2, cfg=cfg, steps=4))
    expected = []
    for step in range(4):
        expected += ["pred_cond", (2, 4 if step in guided_steps else 2)]
        if cfg > 1:
            expected += ["pred_uncond", (2, 2)]
    assert events == expected


def test_guider_cfg_window(pipes):
    """The guider's own CFG window (``stop=0.5``: CFG on steps 0 and 1 of 4 only): the uncond calls stop, the cond
    calls carry the twins throughout; fused == eager, disable and scale=0 exact."""
    pipe = pipes["t2v"]
    inputs = H.inputs(pipe, batch=2, steps=4)
    with guider_of(pipe, H.guider(6.0, stop=0.5)):
        with call_log(pipe) as (events, _), headpag.fused(pipe, "1:0"):
            H.run(pipe, inputs)
        check_fused_eager_restore(pipe, inputs, HEADS, run=H.run)
    cond, uncond = ["pred_cond", (2, 4)], ["pred_uncond", (2, 2)]
    assert events == 2 * (cond + uncond) + 2 * cond


def test_uncond_call_gets_the_cond_delta(pipes):
    """One flow-matching Euler step: guided - plain is the same with CFG on and off (the uncond call is shifted by
    the cond call's delta, so the guider's CFG passes the delta through unscaled)."""
    pipe = pipes["t2v"]
    shifts = {}
    for cfg in (6.0, 1.0):
        inputs = H.inputs(pipe, cfg=cfg, steps=1)
        shifts[cfg] = guided(pipe, "fused", HEADS, inputs, run=H.run) - H.run(pipe, inputs)
    assert effect(shifts[1.0], torch.zeros_like(shifts[1.0])) > MIN_EFFECT
    close(shifts[6.0], shifts[1.0], "families")


@pytest.fixture(scope="module")
def real_t2v():
    """Text-to-video with the pipeline's own 729 masked image-condition tokens."""
    return H.t2v(image_tokens=H.REAL_T2V_IMAGE_TOKENS)


def test_image_condition_tokens(pipes, real_t2v):
    """The 729 image-condition tokens of text-to-video are masked zeros: 16 of them give the same video bit for bit;
    fused == eager, disable and scale=0 exact with the real count."""
    inputs = H.inputs(real_t2v, steps=1)
    assert torch.equal(H.run(real_t2v, inputs), H.run(pipes["t2v"], inputs))
    check_fused_eager_restore(real_t2v, inputs, HEADS, run=H.run, mode="image")


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("kind", ["t2v", "real-t2v", "i2v"])
def test_text_tokens_last(pipes, real_t2v, kind, mode):
    """The selected layer is told n_text = image-condition + ByT5 + Qwen tokens and text LAST, and the last n_text
    values of its joint attention are the text stream's (values get no RoPE)."""
    pipe = real_t2v if kind == "real-t2v" else pipes[kind]
    attn = pipe.transformer.transformer_blocks[1].attn
    handle, text = text_values(attn)
    try:
        with routed_calls() as calls, headpag.fused(pipe, "1:1", mode=mode):
            H.run(pipe, H.inputs(pipe, cfg=1.0, steps=1))
    finally:
        handle.remove()
    n_text = H.n_text(pipe)
    image_tokens = {"t2v": H.T2V_IMAGE_TOKENS, "real-t2v": H.REAL_T2V_IMAGE_TOKENS, "i2v": H.SIGLIP_TOKENS}[kind]
    assert n_text == image_tokens + H.TEXT_2_LEN + H.TEXT_LEN
    assert [(c["layer"], c["n_text"], c["text_first"]) for c in calls] == [("transformer_blocks.1.attn", n_text, False)]
    v = calls[0]["v"]
    assert v.shape[:2] == (4, H.VIDEO_TOKENS + n_text)  # 2 cond rows + 2 twins
    assert torch.equal(v[:, -n_text:], text[0])


# --- against independent perturbed passes --------------------------------------------------------------------------


def perturbed_copy(pipe, layer: int, mode: str) -> torch.nn.Module:
    """A copy of the transformer whose ``transformer_blocks[layer].attn`` runs diffusers' identity attention (joint)
    or a text-LAST SDPA under the call's own mask (image), ``H.n_text`` text tokens."""
    if mode == "image":
        return sdpa_perturbed_copy(pipe, f"transformer_blocks.{layer}.attn", mode, n_text=H.n_text(pipe), text="last")
    model = copy.deepcopy(pipe.transformer)
    model.transformer_blocks[layer].attn.processor._attention_backend = "native"  # SDPA, which the hook replaces
    HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[layer].attn).register_hook(
        AttentionProcessorSkipHook(None, skip_attention_scores=True), "skip_attention_scores")
    return model


@pytest.mark.parametrize("case", ["t2v-cfg", "t2v-no-cfg", "t2v-original", "i2v-cfg", "i2v-2x2"])
@pytest.mark.parametrize("mode", ["joint", "image"])
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(pipes, mode, case):
    """Every head of layer 1 with u=1 equals the reference fold (delta = scale (cond - perturbed) added to the cond
    call and to the uncond call of the step) of diffusers' identity attention (joint) or of a text-last SDPA under
    the call's own text-padding mask (image) on that layer, fused and eager: checks the text-last order and span,
    the twins' masks, the fold into both guider calls (also under the guider's original CFG formulation, which
    adds ``s (cond - uncond)`` to the cond prediction), and the scale."""
    kind, variant = case.split("-", 1)
    pipe = pipes[kind]
    cfg = 1.0 if variant == "no-cfg" else 6.0
    kw = dict(videos_per_prompt=2) if variant == "2x2" else {}
    formulation = H.guider(cfg, use_original_formulation=variant == "original")
    with guider_of(pipe, formulation):
        check_matches_reference(pipe, H.inputs(pipe, cfg=cfg, **kw), "1:*", module_pass(perturbed_copy(pipe, 1, mode)),
                                scale=2.0, cfg=cfg > 1, calls="separate", kind="fp32", run=H.run, u=1.0, mode=mode)


# --- refused -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guider", [lambda: ClassifierFreeZeroStarGuidance(guidance_scale=6.0),
                                    lambda: H.guider(6.0, guidance_rescale=0.5)], ids=["zero-star", "rescale"])
@pytest.mark.parametrize("execution", ["fused", "eager"])
def test_unsupported_guiders_are_refused(pipes, guider, execution):
    """Another guider (CFG-Zero* makes the same two calls but scales the uncond prediction by a projection of the
    cond one) or guidance_rescale > 0 (measured against the moved cond prediction): refused at the first guided call,
    never silently off; the pipeline runs as before once disabled."""
    pipe = pipes["t2v"]
    inputs = H.inputs(pipe, cfg=6.0, steps=1)
    inputs.pop("guidance_scale")
    with guider_of(pipe, guider()):
        plain = pipe(**inputs, generator=torch.Generator().manual_seed(0)).frames
        headpag.enable(pipe, "1:0", execution=execution)
        try:
            with pytest.raises(ValueError, match="ClassifierFreeGuidance|guidance_rescale"):
                pipe(**inputs, generator=torch.Generator().manual_seed(0))
        finally:
            headpag.disable(pipe)
        assert torch.equal(pipe(**inputs, generator=torch.Generator().manual_seed(0)).frames, plain)


def test_unknown_cache_context_is_refused(pipes):
    """A denoiser call under a context other than the guider's two (e.g. another guider's skip-layer call) raises."""
    pipe = pipes["t2v"]
    pipe.scheduler.set_timesteps(2)
    model = pipe.transformer
    args, kwargs = direct_call(pipe.scheduler.timesteps[:1])
    with headpag.fused(pipe, "1:0"), torch.no_grad():
        with model.cache_context("pred_cond"):
            model(*args, **kwargs)  # the guider's cond call
        with pytest.raises(ValueError, match="pred_cond_skip"), model.cache_context("pred_cond_skip"):
            model(*args, **kwargs)


def test_other_processor_on_a_selected_layer_is_refused():
    pipe = H.t2v()
    pipe.transformer.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn.*AttnProcessor2_0"):
        headpag.enable_fused(pipe, "1:0")
    assert not headpag.is_enabled(pipe)
