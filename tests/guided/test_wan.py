"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): text-to-video and image-to-video.

Self-attention ``attn1`` over the video tokens is the layer; the loop makes a cond call under
``cache_context("cond")`` and then, with CFG, an uncond call under ``cache_context("uncond")`` (the cond call carries
the twins, the uncond call is shifted by its delta). Oracles: the eager implementation; the unpatched pipeline for
``scale=0`` / after disable; and a reference fold (``delta = w * (cond - perturbed)`` added to every call's output,
whatever its order) whose perturbed pass is diffusers' own identity attention (``AttentionProcessorSkipHook`` with
``skip_attention_scores``, the hook ``apply_layer_skip`` attaches; ``apply_layer_skip`` itself does not know
``WanAttnProcessor``) on every head of a layer.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from diffusers.hooks import HookRegistry
from diffusers.hooks.layer_skip import AttentionProcessorSkipHook
from diffusers.models.attention_processor import AttnProcessor2_0

import headpag
from headpag.archs.wan import WAN
from support import models_wan as W
from support.checks import forward_order
from support.reference import check_matches_reference, module_pass

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def t2v():
    return W.wan()


@pytest.fixture(scope="module")
def i2v():
    """Wan 2.1 I2V: CLIP image tokens in the cross-attention, 12 input channels."""
    return W.wan_i2v()


@pytest.fixture(scope="module")
def ti2v():
    """Wan 2.2 TI2V image-to-video: per-token timesteps, 0 on the conditioning frame's tokens."""
    return W.wan_i2v(expand_timesteps=True)


# --- layers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [dict(), dict(num_layers=3, heads=4, head_dim=8), dict(image_dim=W.CLIP_DIM)],
                         ids=["t2v", "3x4", "i2v"])
def test_list_layers(build):
    model = W.wan_transformer(**build)
    n, heads, head_dim = build.get("num_layers", W.LAYERS), build.get("heads", W.HEADS), build.get("head_dim", W.HEAD_DIM)
    layers = headpag.list_layers(model)
    assert [(l.index, l.name, l.heads, l.head_dim, l.kind, l.fork_unit) for l in layers] == [
        (i, f"blocks.{i}.attn1", heads, head_dim, "self", f"blocks.{i}") for i in range(n)
    ]
    assert headpag.forward_units(model) == [f"blocks.{i}" for i in range(n)]
    for layer in layers:  # the layer is the block's self-attention; attn2 (text / image) never is
        attn = model.get_submodule(layer.name)
        assert attn is model.blocks[layer.index].attn1 and not attn.is_cross_attention
        assert attn.add_k_proj is None and type(attn.processor).__name__ in WAN.processors


def test_pipelines_list_the_first_transformers_layers(t2v, i2v):
    for pipe in (t2v, i2v):
        assert headpag.get_denoiser(pipe) is pipe.transformer
        assert [l.name for l in headpag.list_layers(pipe)] == ["blocks.0.attn1", "blocks.1.attn1"]


def test_forward_order():
    """Layer i is the i-th self-attention the forward pass runs."""
    model = W.wan_transformer(num_layers=3)
    order = forward_order({l.index: model.get_submodule(l.name) for l in headpag.list_layers(model)}, lambda: model(
        torch.randn(1, W.Z_DIM, 2, 4, 4), torch.tensor([500]), torch.randn(1, W.TEXT_LEN, W.TEXT_DIM)))
    assert order == [0, 1, 2]


def test_other_processor_on_a_selected_layer_is_refused():
    pipe = W.wan()
    pipe.transformer.blocks[1].attn1.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"blocks\.1\.attn1.*AttnProcessor2_0"):
        headpag.enable_fused(pipe, "1:0")
    assert not headpag.is_enabled(pipe)
    headpag.enable_fused(pipe, "0:0")  # the other layer is fine
    headpag.disable(pipe)


def test_scheduler_timestep():
    """Per-token timesteps (B, seq) map back to each row's scheduler timestep, the maximum: image-to-video zeroes
    the conditioning frame's tokens, which come first. (B,) timesteps pass as they are."""
    t = torch.tensor([999.0, 600.0])
    per_token = torch.cat([torch.zeros(2, 4), t[:, None].expand(2, 12)], dim=1)
    assert torch.equal(WAN.scheduler_timestep(per_token), t)
    assert WAN.scheduler_timestep(t) is t


# --- fused == eager, effect, restore, scale=0 -------------------------------------------------------------------


@pytest.mark.parametrize("heads", ["1:0", "0:1,1:*@0.5"], ids=["late-fork", "fork-at-0"])
@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_t2v(t2v, cfg, mode, heads):
    W.check_fused_eager_restore(t2v, W.wan_inputs(cfg=cfg), heads, mode=mode)


@pytest.mark.parametrize("rows", [dict(batch=2, videos_per_prompt=2), dict(batch=1, videos_per_prompt=2)],
                         ids=["2x2", "1x2-broadcast"])
@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_t2v_batch(t2v, cfg, rows):
    """2 prompts x 2 videos (4 embedding rows, the ones encode_prompt makes); and one embedding row with
    ``num_videos_per_prompt=2``, which diffusers runs by broadcasting the text batch in the cross-attention."""
    if rows["batch"] == 1:
        inputs = W.wan_inputs(cfg=cfg, num_videos_per_prompt=2)
    else:
        inputs = W.wan_inputs(cfg=cfg, **rows)
    W.check_fused_eager_restore(t2v, inputs, "0:0,1:1")


def test_t2v_per_token_timesteps():
    """Wan 2.2 TI2V's text-to-video: ``expand_timesteps`` passes (B, seq) timesteps, all equal."""
    W.check_fused_eager_restore(W.wan(expand_timesteps=True), W.wan_inputs(batch=2), "1:*")


@pytest.mark.parametrize("batch", [dict(), dict(batch=2, videos_per_prompt=2)], ids=["1", "2x2"])
@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_i2v(i2v, cfg, batch):
    """Wan 2.1 I2V: ``encoder_hidden_states_image`` (CLIP tokens, repeated per prompt row by the pipeline) and the
    image condition in the input channels are per row."""
    W.check_fused_eager_restore(i2v, W.wan_i2v_inputs(i2v, cfg=cfg, **batch), "0:1,1:0")


@pytest.mark.parametrize("batch", [dict(), dict(batch=2, videos_per_prompt=2)], ids=["1", "2x2"])
@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_ti2v(ti2v, cfg, batch):
    W.check_fused_eager_restore(ti2v, W.wan_i2v_inputs(ti2v, cfg=cfg, **batch), "1:0")


# --- against diffusers' identity attention -----------------------------------------------------------------------


def skipping_copy(pipe, layer: int) -> torch.nn.Module:
    """A copy of the transformer whose ``blocks[layer].attn1`` runs diffusers' identity attention."""
    skipping = copy.deepcopy(pipe.transformer)
    HookRegistry.check_if_exists_or_initialize(skipping.blocks[layer].attn1).register_hook(
        AttentionProcessorSkipHook(None, skip_attention_scores=True), "skip_attention_scores")
    return skipping


def with_cond_embeddings(inputs: dict):
    """``cond_inputs`` for the reference fold: a call's arguments with the cond embeddings ``c`` of ``inputs``."""
    cond = inputs["prompt_embeds"]
    return lambda args, kwargs: (args, dict(kwargs, encoder_hidden_states=cond.to(kwargs["encoder_hidden_states"])))


@pytest.mark.parametrize("case", ["t2v-cfg", "t2v-no-cfg", "t2v-2x2", "i2v-cfg", "ti2v-cfg"])
def test_joint_mode_matches_diffusers_identity_attention(t2v, i2v, ti2v, case):
    """mode="joint" on every head of a layer, u=1, equals the reference fold with diffusers' identity attention,
    fused and eager: so the uncond call gets the cond call's delta of the same step. The fold gives every
    transformer call ``delta = scale * (T(x, t, c) - T_skip(x, t, c))`` on the cond embeddings ``c``, with
    ``T_skip`` :func:`skipping_copy`: independent of the order of the cond and uncond calls."""
    pipe = {"t2v": t2v, "i2v": i2v, "ti2v": ti2v}[case.split("-")[0]]
    kw = dict(cfg=1.0 if case.endswith("no-cfg") else 5.0)
    if case.endswith("2x2"):
        kw.update(batch=2, videos_per_prompt=2)
    inputs = W.wan_i2v_inputs(pipe, **kw) if isinstance(pipe, WanImageToVideoPipeline) else W.wan_inputs(**kw)
    check_matches_reference(pipe, inputs, "1:*", module_pass(skipping_copy(pipe, 1)), scale=3.0, calls="each",
                            cond_inputs=with_cond_embeddings(inputs), kind="fp32", run=W.run, u=1.0, mode="joint")


# --- the loop: cond then uncond, per-token timesteps, two transformers -------------------------------------------


@contextlib.contextmanager
def call_log(transformer):
    """Logs, in order, the name of each ``cache_context`` the loop opens on ``transformer`` and the rows each
    call runs through ``blocks[0]``."""
    events = []
    original = transformer.cache_context

    @contextlib.contextmanager
    def logged(name, **kwargs):
        events.append(name)
        with original(name, **kwargs):
            yield

    transformer.cache_context = logged
    handle = transformer.blocks[0].register_forward_pre_hook(lambda m, a, k: events.append(a[0].shape[0] if a else
                                                                                          k["hidden_states"].shape[0]),
                                                             with_kwargs=True)
    try:
        yield events
    finally:
        handle.remove()
        del transformer.cache_context


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_cond_call_carries_the_twins_and_comes_first(cfg):
    pipe = W.wan()
    with call_log(pipe.transformer) as events:
        with headpag.fused(pipe, "0:0"):
            W.run(pipe, W.wan_inputs(cfg=cfg, steps=2))
    per_step = ["cond", 2, "uncond", 1] if cfg > 1 else ["cond", 2]
    assert events == per_step * 2


@pytest.mark.parametrize("interval, guided_steps", [((0.0, 0.5), [0]), ((0.5, 1.0), [1])])
def test_ti2v_interval_reads_the_scheduler_timestep(ti2v, interval, guided_steps):
    """Wan 2.2 TI2V image-to-video passes (B, seq) timesteps whose first entries (the conditioning frame) are 0:
    the step is still read right (the first entry alone would place every step at the end of the schedule)."""
    with call_log(ti2v.transformer) as events:
        with headpag.fused(ti2v, "0:*", interval=interval):
            W.run(ti2v, W.wan_i2v_inputs(ti2v, steps=2))
    rows = [e for e in events if isinstance(e, int)]
    assert rows == [n for step in range(2) for n in ((2 if step in guided_steps else 1), 1)]


def test_two_transformers_are_refused_before_sampling():
    """Wan 2.2 A14B: ``transformer`` runs the steps with ``t >= boundary_ratio * 1000``, ``transformer_2`` the
    others. headpag guides one denoiser, so it refuses rather than leave the low-noise steps unguided."""
    pipe = W.wan(transformer_2=True, boundary_ratio=0.8)
    for execution in ("fused", "eager"):
        with pytest.raises(ValueError, match=r"WanPipeline has a second denoiser \(transformer_2"):
            headpag.enable(pipe, "1:*", execution=execution)
        assert not headpag.is_enabled(pipe)


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="Wan 2.1 FLF2V passes 2 B rows of image tokens (first and last frame) that the model folds "
                          "to B: headpag widens per-row arguments by leading dim B only")
def test_flf2v_is_not_supported():
    torch.manual_seed(0)
    config = dict(W.wan_transformer(in_channels=2 * W.Z_DIM + 4, image_dim=W.CLIP_DIM).config)
    transformer = WanTransformer3DModel.from_config({**config, "pos_embed_seq_len": 2 * 17}).eval()
    pipe = W.wan_i2v()
    pipe.transformer = transformer
    inputs = W.wan_i2v_inputs(pipe) | dict(last_image=W.image(5))
    W.run(pipe, inputs)  # diffusers runs it
    W.guided(pipe, "fused", "0:0", inputs)
