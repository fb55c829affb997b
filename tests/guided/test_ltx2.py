"""LTX-2 / LTX-2.3 (``LTX2VideoTransformer3DModel``; ``LTX2Pipeline``, ``LTX2ImageToVideoPipeline``): joint audio-video.

The video self-attention ``attn1`` is the layer; the audio stream rides along in every row (the twins carry their
own audio), and the video prediction is guided (the audio prediction is the pipeline's own). The loop makes one
``[uncond, cond]`` call per step under ``cache_context("cond_uncond")`` (the twins ride there), then the STG and
modality-guidance side passes on the cond rows (shifted by the step's delta). Every output here is the latent video
and the latent audio together (``support.models_ltx2.run``), so each comparison covers both.

Oracles: the unpatched pipeline (``scale=0``, after disable); the eager implementation; and a reference fold whose
perturbed pass is a copy of the transformer with one ``attn1`` on SDPA under an independent perturbation (the values
for ``u = 1``; ``(1 - u) SDPA + u V`` under the call's own mask for SoftPAG), the delta added to the video output only.

Every comparison covers the video and the audio outputs: a fused call's fold narrows both to the pipeline's rows.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import LTX2VideoTransformer3DModel
from torch.overrides import TorchFunctionMode

import headpag
from headpag.archs import call_pattern_of
from headpag.archs.ltx2 import LTX2, LTX2_CALLS
from support import models_ltx2 as L
from support.checks import check_fused_eager_restore, check_layer_table, effect
from support.reference import check_matches_reference, module_pass, sdpa_perturbed_copy, select_rows
from support.tolerances import MIN_EFFECT, close

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS = "0:1,1:*@0.5"  # forks at block 0, SoftPAG on layer 1


@pytest.fixture(scope="module")
def ltx20():
    return L.ltx2()


@pytest.fixture(scope="module")
def ltx23():
    """LTX-2.3's layout: gated attention, prompt modulation, LTX2PerturbedAttnProcessor, no caption projection."""
    return L.ltx2(ltx23=True)


@pytest.fixture(scope="module")
def i2v():
    return L.ltx2_i2v()


def pipe_of(request, name: str):
    return request.getfixturevalue(name)


def inputs_for(pipe, **kw) -> dict:
    return L.ltx2_i2v_inputs(**kw) if type(pipe).__name__ == "LTX2ImageToVideoPipeline" else L.ltx2_inputs(**kw)


# --- layers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [dict(), dict(ltx23=True), dict(num_layers=3, heads=4, head_dim=4)],
                         ids=["ltx2.0", "ltx2.3", "3x4"])
def test_list_layers(build):
    model = L.ltx2_transformer(**build)
    n = build.get("num_layers", L.LAYERS)
    heads, head_dim = build.get("heads", L.HEADS), build.get("head_dim", L.HEAD_DIM)
    layers = headpag.list_layers(model)
    assert [(x.index, x.name, x.heads, x.head_dim, x.kind, x.fork_unit) for x in layers] == [
        (i, f"transformer_blocks.{i}.attn1", heads, head_dim, "self", f"transformer_blocks.{i}") for i in range(n)]
    assert headpag.forward_units(model) == [f"transformer_blocks.{i}" for i in range(n)]
    for layer in layers:  # the video self-attention; the audio stream's (2 heads of 4) never is a layer
        block = model.transformer_blocks[layer.index]
        assert model.get_submodule(layer.name) is block.attn1 and block.audio_attn1.heads == L.AUDIO_HEADS
        assert type(block.attn1.processor).__name__ in LTX2.processors
    expected = "LTX2PerturbedAttnProcessor" if build.get("ltx23") else "LTX2AudioVideoAttnProcessor"
    assert type(model.transformer_blocks[0].attn1.processor).__name__ == expected


@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_real_checkpoint_layers(version):
    """diffusers' conversion configs (scripts/convert_ltx2_to_diffusers.py; the class defaults are LTX-2.0's):
    48 video self-attention layers of 32 heads of 128 (the audio stream's 32 heads of 64 are not layers)."""
    options = dict(gated_attn=True, cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True,
                   perturbed_attn=True, use_prompt_embeddings=False, rope_type="split") if version == "2.3" else {}
    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**options)
    layers = headpag.list_layers(model)
    assert len(layers) == 48 and {(x.heads, x.head_dim, x.kind) for x in layers} == {(32, 128, "self")}
    assert layers[47].name == "transformer_blocks.47.attn1"
    assert {(b.audio_attn1.heads, b.audio_attn1.head_dim) for b in model.transformer_blocks} == {(32, 64)}


def test_layer_table_and_forward_order(ltx20):
    """list_layers / forward_units as expected, and a pipeline call runs the ``attn1`` modules in that order."""
    check_layer_table(ltx20, [(f"transformer_blocks.{i}.attn1", f"transformer_blocks.{i}") for i in range(L.LAYERS)],
                      [L.HEADS] * L.LAYERS, [L.HEAD_DIM] * L.LAYERS, "self",
                      [f"transformer_blocks.{i}" for i in range(L.LAYERS)], lambda: L.run(ltx20, L.ltx2_inputs()))


def test_other_processor_on_a_selected_layer_is_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = L.ltx2()
    pipe.transformer.transformer_blocks[1].attn1.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn1.*AttnProcessor2_0"):
        headpag.enable_eager(pipe, "1:0")
    assert not headpag.is_enabled(pipe)


# --- the call pattern ----------------------------------------------------------------------------------------------


def test_call_pattern(ltx20, i2v):
    """Both pipelines follow LTX-2's loop; the STG and modality passes are side passes (no rows of their own), by
    their cache context or by their arguments; an unknown context raises."""
    for pipe in (ltx20, i2v):
        assert call_pattern_of(pipe) is LTX2_CALLS
    assert dict(LTX2_CALLS.cfg_off) == {"guidance_scale": 1.0, "audio_guidance_scale": 1.0}
    den = ltx20.transformer
    for context in ("uncond_stg", "uncond_modality"):
        assert LTX2_CALLS.layout(ltx20, den, {}, 1, context) is None
    assert LTX2_CALLS.layout(ltx20, den, {"isolate_modalities": True}, 1, "cond_uncond") is None
    assert LTX2_CALLS.layout(ltx20, den, {"spatio_temporal_guidance_blocks": [1]}, 1, None) is None
    with pytest.raises(ValueError, match=r"cache_context\('uncond'\)"):
        LTX2_CALLS.layout(ltx20, den, {}, 1, "uncond")


@pytest.mark.parametrize("name", ["LTX2ConditionPipeline", "LTX2InContextPipeline", "LTX2HDRPipeline",
                                  "LTX2DFRPipeline", "LTX2DFRTemporalRefinePipeline"])
def test_unregistered_ltx2_pipelines_are_not_read_as_a_pattern(name):
    """The other LTX-2 loops (three calls per step under LTX-2's cache contexts, or tiled calls) are not registered
    and not read as a built-in pattern: enabling headpag on them raises before sampling."""
    import diffusers

    from headpag.archs.loop_reading import detect_call_pattern

    assert detect_call_pattern(getattr(diffusers, name), LTX2).pattern is None


@contextlib.contextmanager
def call_log(transformer):
    """Logs, in order, each ``cache_context`` the loop opens on ``transformer`` and the rows of each call's ``attn1``
    in block 0 and block 1 (``(rows0, rows1)``)."""
    events, rows = [], {}
    original = transformer.cache_context

    @contextlib.contextmanager
    def logged(name, **kwargs):
        events.append(name)
        with original(name, **kwargs):
            yield

    def hook(i):
        def record(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                rows["0"] = x.shape[0]
            else:
                events.append((rows.pop("0"), x.shape[0]))
        return record

    transformer.cache_context = logged
    handles = [transformer.transformer_blocks[i].attn1.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i in range(2)]
    try:
        yield events
    finally:
        for h in handles:
            h.remove()
        del transformer.cache_context


@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_main_call_carries_the_twins_side_passes_do_not(ltx20, cfg):
    """Per step: the ``cond_uncond`` call runs block 0 on the base rows and block 1 (the fork, layer 1) on the base
    rows and a twin per cond row; the STG and modality passes run the cond rows only; with 2 prompts x 2 videos."""
    inputs = L.ltx2_inputs(cfg=cfg, stg=1.0, modality=3.0, batch=2, videos_per_prompt=2)
    with call_log(ltx20.transformer) as events, headpag.fused(ltx20, "1:0"):
        L.run(ltx20, inputs)
    base = 8 if cfg > 1 else 4
    assert events == ["cond_uncond", (base, base + 4), "uncond_stg", (4, 4), "uncond_modality", (4, 4)] * 2


@pytest.mark.parametrize("name, interval, guided_steps", [
    ("ltx20", (0.0, 0.5), [0]), ("ltx20", (0.5, 1.0), [1]), ("i2v", (0.0, 0.5), [0]), ("i2v", (0.5, 1.0), [1])])
def test_interval_reads_the_scheduler_timestep(request, name, interval, guided_steps):
    """The step is read from the call's timestep: image-to-video passes ``(B, N)`` timesteps with 0 on the
    conditioning frame's tokens (the first ones), whose first entry alone would place every step at the end."""
    pipe = pipe_of(request, name)
    with call_log(pipe.transformer) as events, headpag.fused(pipe, "0:*", interval=interval):
        L.run(pipe, inputs_for(pipe))
    assert events == [e for step in range(2) for e in ("cond_uncond", (3, 3) if step in guided_steps else (2, 2))]


def test_scheduler_timestep():
    t = torch.tensor([1000.0, 500.0])
    per_token = torch.cat([torch.zeros(2, 4), t[:, None].expand(2, 12)], dim=1)
    assert torch.equal(LTX2.scheduler_timestep(per_token), t)
    assert LTX2.scheduler_timestep(t) is t


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("execution", ["fused", "eager"])
@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_guidance_rescale_is_refused(ltx20, execution, cfg):
    """The pipelines rescale the guided video x0 against the cond x0 (CFG or not; default 0.7): refused.
    ``audio_guidance_rescale`` works on the audio prediction, which headpag does not move."""
    with pytest.raises(ValueError, match=r"guidance_rescale=0\.7 is not supported.*guidance_rescale=0"):
        L.guided(ltx20, execution, "1:0", L.ltx2_inputs(cfg=cfg, guidance_rescale=0.7))
    inputs = L.ltx2_inputs(cfg=cfg, audio_guidance_rescale=0.7)
    assert effect(L.guided(ltx20, execution, "1:0", inputs), L.run(ltx20, inputs)) > MIN_EFFECT


# --- fused == eager, effect, restore, scale=0 ---------------------------------------------------------------------


@pytest.mark.parametrize("heads", ["1:0", HEADS], ids=["late-fork", "fork-at-0"])
@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("name", ["ltx20", "ltx23", "i2v"])
def test_fused_eager_restore(request, name, cfg, heads):
    pipe = pipe_of(request, name)
    check_fused_eager_restore(pipe, inputs_for(pipe, cfg=cfg), heads, run=L.run)


@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("name", ["ltx20", "ltx23"])
def test_two_prompts_two_videos_side_passes(request, name, cfg):
    """2 prompts (padded to different lengths) x 2 videos, STG and modality guidance on."""
    pipe = pipe_of(request, name)
    inputs = L.ltx2_inputs(cfg=cfg, batch=2, videos_per_prompt=2, lengths=[3, 6], stg=1.0, modality=3.0)
    check_fused_eager_restore(pipe, inputs, HEADS, run=L.run)


def test_image_mode_is_the_identity_too(ltx20):
    """No text tokens in the layer: ``mode="image"`` is the identity over the video tokens, as ``"joint"``."""
    inputs = L.ltx2_inputs()
    joint, image = (L.guided(ltx20, "fused", "1:*", inputs, mode=mode) for mode in ("joint", "image"))
    close(image, joint, "families")


# --- an independent perturbed pass ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("name, layer", [("ltx20", 1), ("ltx23", 0), ("i2v", 1)])
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(request, name, layer, cfg):
    """Every head of one layer with u=1 equals the reference fold of that ``attn1`` returning its values (on SDPA),
    fused and eager: the delta goes to the video prediction of the uncond and cond rows, the audio is untouched
    (``audio_guidance_rescale`` on: exact, as it rescales the unmoved audio)."""
    pipe = pipe_of(request, name)
    perturbed = sdpa_perturbed_copy(pipe, f"transformer_blocks.{layer}.attn1", "joint", n_text=0)
    inputs = inputs_for(pipe, cfg=cfg, audio_guidance_rescale=0.7)
    check_matches_reference(pipe, inputs, f"{layer}:*", module_pass(perturbed), scale=2.0, cfg=cfg > 1, kind="fp32",
                            run=L.run, u=1.0, mode="joint")


class SoftSDPA(TorchFunctionMode):
    """SoftPAG written on SDPA: ``(1 - u) * SDPA(q, k, v, mask) + u * v`` (every head, the call's own mask)."""

    def __init__(self, u: float):
        super().__init__()
        self.u = u

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(("query", "key", "value", "attn_mask"), args)) | kwargs
        v = call["value"]
        out = func(call["query"], call["key"], v, attn_mask=call.get("attn_mask"), scale=call.get("scale"))
        return (1 - self.u) * out + self.u * v


def soft_copy(pipe, attention: str, u: float) -> torch.nn.Module:
    model = copy.deepcopy(pipe.transformer)
    attn = model.get_submodule(attention)
    attn.processor._attention_backend = "native"
    original = attn.forward

    def forward(*args, **kwargs):
        with SoftSDPA(u):
            return original(*args, **kwargs)

    attn.forward = forward
    return model


@contextlib.contextmanager
def video_self_attention_mask(pipe, seed: int = 3):
    """Every transformer call gets a ``video_self_attention_mask`` (IC-LoRA's multiplicative ``(B, N, N)`` mask on the
    video self-attention), a fixed random 0/1 pattern with a full diagonal, one per row."""
    n = L.VIDEO_TOKENS
    mask = (torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) > 0.4).float()
    mask.fill_diagonal_(1.0)

    def add(module, args, kwargs):
        rows = kwargs["hidden_states"].shape[0]
        return args, {**kwargs, "video_self_attention_mask": mask.expand(rows, n, n)}

    handle = pipe.transformer.register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield mask
    finally:
        handle.remove()


@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_soft_heads_under_a_video_self_attention_mask(ltx23, cfg):
    """SoftPAG (u=0.5) on every head of layer 1 under a per-row video self-attention mask equals the reference fold
    of ``(1 - u) SDPA(mask) + u V`` on that layer, fused and eager: the mask is widened with the twins and reaches
    the perturbed attention as SDPA takes it."""
    inputs = L.ltx2_inputs(cfg=cfg)
    with video_self_attention_mask(ltx23):
        masked = L.run(ltx23, inputs)
        check_matches_reference(ltx23, inputs, "1:*", module_pass(soft_copy(ltx23, "transformer_blocks.1.attn1", 0.5)),
                                scale=2.0, cfg=cfg > 1, kind="fp32", run=L.run, u=0.5)
    assert effect(masked, L.run(ltx23, inputs)) > MIN_EFFECT  # the mask matters


@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_side_passes_get_the_step_delta(ltx23, cfg):
    """With STG (LTX-2.3's perturbed processor skipping layer 1's attention) and modality guidance on, every head of
    layer 1 equals a reference fold that computes the delta on the ``cond_uncond`` call and adds it to that call's
    video rows and to the video output of the STG and modality passes of the same step."""
    pipe = ltx23
    perturbed = sdpa_perturbed_copy(pipe, "transformer_blocks.1.attn1", "joint", n_text=0)
    inputs = L.ltx2_inputs(cfg=cfg, stg=1.0, modality=3.0)
    state = {}

    def fold(module, args, kwargs, output):
        video = output[0]
        if kwargs.get("isolate_modalities") or kwargs.get("spatio_temporal_guidance_blocks"):
            return (video + state["delta"], *output[1:])
        n = video.shape[0]
        rows = slice(n // 2, n) if cfg > 1 else slice(0, n)
        state["delta"] = delta = 2.0 * (video[rows] - perturbed(**select_rows(kwargs, n, rows))[0])
        return (video + (delta.repeat(2, 1, 1) if cfg > 1 else delta), *output[1:])

    handle = pipe.transformer.register_forward_hook(fold, with_kwargs=True)
    try:
        expected = L.run(pipe, inputs)
    finally:
        handle.remove()
    assert effect(expected, L.run(pipe, inputs)) > MIN_EFFECT
    for execution in ("fused", "eager"):
        close(L.guided(pipe, execution, "1:*", inputs, scale=2.0, u=1.0), expected, "fp32", execution)
