"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): text-to-video and image-to-video.

Self-attention ``attn1`` over the video tokens is the layer; the loop makes a cond call under
``cache_context("cond")`` and then, with CFG, an uncond call under ``cache_context("uncond")`` (the cond call carries
the twins, the uncond call is shifted by its delta). Oracles: the eager implementation; the unpatched pipeline for
``scale=0`` / after disable; and a reference fold (``delta = w * (cond - perturbed)`` added to every call's output,
whatever its order) whose perturbed pass is diffusers' own identity attention (``AttentionProcessorSkipHook`` with
``skip_attention_scores``, the hook ``apply_layer_skip`` attaches; ``apply_layer_skip`` itself does not know
``WanAttnProcessor``) on every head of a layer. Wan 2.2 A14B (``transformer`` on the high-noise steps,
``transformer_2`` on the others): both guided, the reference fold hooked on each.
"""

from __future__ import annotations

import contextlib
import copy
import types

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from diffusers.hooks import HookRegistry
from diffusers.hooks.layer_skip import AttentionProcessorSkipHook
from diffusers.models.attention_processor import AttnProcessor2_0

import headpag
from headpag.archs import denoisers_of, named_denoisers
from headpag.archs.wan import WAN
from headpag.guided.routing import DISPATCH_ROUTING
from headpag.guided.session import sessions_of
from support import models_wan as W
from support.checks import check_fused_eager_restore, effect, forward_order, snapshot
from support.reference import check_matches_reference, folded, module_pass
from support.tolerances import MIN_EFFECT, close

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


def skipping_copy(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """A copy of the transformer ``model`` whose ``blocks[layer].attn1`` runs diffusers' identity attention."""
    skipping = copy.deepcopy(model)
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
    check_matches_reference(pipe, inputs, "1:*", module_pass(skipping_copy(pipe.transformer, 1)), scale=3.0,
                            calls="each", cond_inputs=with_cond_embeddings(inputs), kind="fp32", run=W.run, u=1.0,
                            mode="joint")


# --- the loop: cond then uncond, per-token timesteps ---------------------------------------------------------------


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


# --- Wan 2.2 A14B: two transformers, both guided ----------------------------------------------------------------
# ``W.wan(transformer_2=True, boundary_ratio=0.8)``: ``transformer`` runs the steps with t >= 800, ``transformer_2``
# the others; of 2 UniPC steps (t = 999, 750) step 0 is transformer's and step 1 transformer_2's (checked below).

TRANSFORMERS = ("transformer", "transformer_2")


@pytest.fixture(scope="module")
def a14b():
    return W.wan(transformer_2=True, boundary_ratio=0.8)


def as_pipe(model: torch.nn.Module) -> types.SimpleNamespace:
    """A stand-in pipeline whose denoiser is ``model``, for the support helpers that take the pipeline's
    ``transformer`` (``snapshot``, ``fold_hook``): used on ``transformer_2``."""
    return types.SimpleNamespace(transformer=model)


def snapshots(pipe) -> dict:
    """``support.checks.snapshot`` (processors, hook registries, forwards) of each transformer."""
    return {name: snapshot(as_pipe(getattr(pipe, name))) for name in TRANSFORMERS}


def test_a14b_denoisers(a14b, t2v):
    assert headpag.get_denoiser(a14b) is a14b.transformer
    assert denoisers_of(a14b) == (a14b.transformer, a14b.transformer_2)
    assert named_denoisers(a14b) == (("transformer", a14b.transformer), ("transformer_2", a14b.transformer_2))
    assert t2v.transformer_2 is None and denoisers_of(t2v) == (t2v.transformer,)
    assert denoisers_of(a14b.transformer_2) == (a14b.transformer_2,)  # a model is its own one denoiser


@pytest.mark.parametrize("interval, guided", [((0.0, 1.0), TRANSFORMERS), ((0.0, 0.5), TRANSFORMERS[:1]),
                                              ((0.5, 1.0), TRANSFORMERS[1:])], ids=["all", "step-0", "step-1"])
def test_a14b_each_transformer_runs_its_steps_with_the_twins(a14b, interval, guided):
    """Each transformer runs one of the two steps (cond, then uncond); the cond call carries the twins on the
    guided steps, whichever transformer runs them: the interval is read over the whole schedule."""
    with call_log(a14b.transformer) as high, call_log(a14b.transformer_2) as low:
        with headpag.fused(a14b, "0:0", interval=interval):
            W.run(a14b, W.wan_inputs(steps=2))
    for name, events in zip(TRANSFORMERS, (high, low)):
        assert events == ["cond", 2 if name in guided else 1, "uncond", 1], name


@pytest.mark.parametrize("heads", ["1:0", "0:1,1:*@0.5"], ids=["late-fork", "fork-at-0"])
@pytest.mark.parametrize("cfg", [dict(cfg=5.0), dict(cfg=5.0, guidance_scale_2=2.0), dict(cfg=1.0)],
                         ids=["cfg", "cfg-2", "no-cfg"])
def test_a14b(a14b, cfg, heads):
    """fused == eager, an effect, disable and ``scale=0`` bit-exact vs the unpatched pipeline; and disable leaves
    both transformers' processors, hook registries and forwards as they were."""
    W.run(a14b, W.wan_inputs(steps=2))  # cache_context gives each transformer a (hookless) registry of its own
    before = snapshots(a14b)
    W.check_fused_eager_restore(a14b, W.wan_inputs(**cfg), heads)
    assert snapshots(a14b) == before


@pytest.mark.parametrize("case", ["both-cfg", "both-cfg-2", "both-no-cfg", "high-cfg", "low-cfg"])
def test_a14b_matches_diffusers_identity_attention(a14b, case):
    """Each transformer's steps are guided: the reference fold (as in
    ``test_joint_mode_matches_diffusers_identity_attention``) hooked on the transformers in ``folds``, each with its
    own :func:`skipping_copy`, equals headpag restricted by the interval to the steps those transformers run (step 0:
    transformer, step 1: transformer_2), fused and eager; each fold alone changes the output."""
    stages, cfg = case.split("-", 1)
    folds, interval = {"both": (TRANSFORMERS, (0.0, 1.0)), "high": (TRANSFORMERS[:1], (0.0, 0.5)),
                       "low": (TRANSFORMERS[1:], (0.5, 1.0))}[stages]
    kw = {"cfg": dict(cfg=5.0), "cfg-2": dict(cfg=5.0, guidance_scale_2=2.0), "no-cfg": dict(cfg=1.0)}[cfg]
    inputs = W.wan_inputs(**kw)
    plain = W.run(a14b, inputs)
    with contextlib.ExitStack() as stack:
        for name in folds:
            model = getattr(a14b, name)
            stack.enter_context(folded(as_pipe(model), module_pass(skipping_copy(model, 1)), 3.0, calls="each",
                                       cond_inputs=with_cond_embeddings(inputs)))
        expected = W.run(a14b, inputs)
    assert effect(expected, plain) > MIN_EFFECT
    for execution in ("fused", "eager"):
        out = W.guided(a14b, execution, "1:*", inputs, scale=3.0, u=1.0, mode="joint", interval=interval)
        close(out, expected, "fp32", execution)


def test_a14b_settings_act_on_both(a14b):
    """is_enabled / configure / set_row_heads / disable on both transformers: configured heads, scale and interval
    give what enabling with them gives (on transformer_2's step too); per-row heads reach both."""
    inputs = W.wan_inputs(batch=2)
    plain = W.run(a14b, inputs)
    ref = {heads: W.guided(a14b, "fused", heads, inputs) for heads in ("0:0", "1:1")}
    high_only = W.guided(a14b, "fused", "1:1", inputs, interval=(0.0, 0.5))
    before = snapshots(a14b)
    assert not headpag.is_enabled(a14b)
    headpag.enable_fused(a14b, "0:0")
    try:
        assert headpag.is_enabled(a14b)
        assert all(snapshots(a14b)[name] != before[name] for name in TRANSFORMERS)  # patched, both
        headpag.configure(a14b, heads="1:1")
        assert torch.equal(W.run(a14b, inputs), ref["1:1"])
        headpag.configure(a14b, interval=(0.0, 0.5))
        assert torch.equal(W.run(a14b, inputs), high_only)
        headpag.configure(a14b, scale=0.0, interval=(0.0, 1.0))
        assert torch.equal(W.run(a14b, inputs), plain)
        headpag.configure(a14b, scale=3.0, heads="0:0")
        assert torch.equal(W.run(a14b, inputs), ref["0:0"])
        headpag.set_row_heads(a14b, ["0:0", "1:1"])  # row j's twin gets head set j, on both steps
        rows = W.run(a14b, inputs)
        close(rows[0], ref["0:0"][0], "families", "row 0")
        close(rows[1], ref["1:1"][1], "families", "row 1")
        headpag.set_row_heads(a14b, None)
        assert torch.equal(W.run(a14b, inputs), ref["0:0"])
    finally:
        headpag.disable(a14b)
    assert not headpag.is_enabled(a14b) and snapshots(a14b) == before
    assert torch.equal(W.run(a14b, inputs), plain)


def test_a14b_replaced_transformer_2():
    """A transformer_2 swapped in after enabling: configure refuses (naming it) rather than guide one stage only;
    disable still removes everything from both the old and the current transformers."""
    pipe = W.wan(transformer_2=True, boundary_ratio=0.8)
    old, new = pipe.transformer_2, W.wan_transformer()
    before = [snapshot(as_pipe(model)) for model in (pipe.transformer, old, new)]
    headpag.enable_fused(pipe, "0:0")
    pipe.transformer_2 = new
    assert headpag.is_enabled(pipe)
    for call in (lambda: headpag.configure(pipe, scale=1.0), lambda: headpag.set_row_heads(pipe, ["0:0"])):
        with pytest.raises(ValueError, match=r"pipe\.transformer_2 carries no headpag patch"):
            call()
    headpag.disable(pipe)
    assert not headpag.is_enabled(pipe)
    assert [snapshot(as_pipe(model)) for model in (pipe.transformer, old, new)] == before


@pytest.mark.parametrize("second, heads", [(dict(num_layers=1), "1:0"), (dict(heads=1, head_dim=24), "0:1")],
                         ids=["fewer-layers", "fewer-heads"])
def test_a14b_mismatched_transformer_2_is_refused(second, heads):
    """Heads that do not resolve on transformer_2 raise naming it, before anything is attached (enable) or with the
    previous settings kept on both (configure, set_row_heads)."""
    pipe = W.wan(transformer_2=True, boundary_ratio=0.8)
    pipe.transformer_2 = W.wan_transformer(**second)
    before, holders = snapshots(pipe), DISPATCH_ROUTING.holders
    error = r"pipe\.transformer_2: (layer|head) 1 .*out of range"
    for execution in ("fused", "eager"):
        with pytest.raises(ValueError, match=error):
            headpag.enable(pipe, heads, execution=execution)
        assert not headpag.is_enabled(pipe) and snapshots(pipe) == before and DISPATCH_ROUTING.holders == holders
    headpag.enable_fused(pipe, "0:0")
    try:
        settings = [(s.settings, s.row_heads) for _, s in sessions_of(pipe)]
        with pytest.raises(ValueError, match=error):
            headpag.configure(pipe, heads=heads)
        with pytest.raises(ValueError, match=error):
            headpag.set_row_heads(pipe, ["0:0", heads])
        assert [(s.settings, s.row_heads) for _, s in sessions_of(pipe)] == settings
        headpag.configure(pipe, heads="0:*")  # a wildcard is every head of the layer on each transformer
        assert [len(s.settings.heads) for _, s in sessions_of(pipe)] == [W.HEADS, second.get("heads", W.HEADS)]
    finally:
        headpag.disable(pipe)
    assert snapshots(pipe) == before


def test_a14b_failure_attaching_transformer_2_leaves_the_pipeline_unpatched():
    """transformer_2's selected layer runs another processor: its session fails after transformer's attached, and
    the pipeline is left unpatched (a previous patch included, as enabling again replaces it)."""
    pipe = W.wan(transformer_2=True, boundary_ratio=0.8)
    pipe.transformer_2.blocks[1].attn1.set_processor(AttnProcessor2_0())
    before, holders = snapshots(pipe), DISPATCH_ROUTING.holders
    headpag.enable_fused(pipe, "0:0")  # layer 0 is fine on both
    assert headpag.is_enabled(pipe)
    for execution in ("fused", "eager"):
        with pytest.raises(ValueError, match=r"pipe\.transformer_2: .*blocks\.1\.attn1.*AttnProcessor2_0"):
            headpag.enable(pipe, "1:0", execution=execution)
        assert not headpag.is_enabled(pipe) and snapshots(pipe) == before and DISPATCH_ROUTING.holders == holders


def flf2v_pipe():
    """Wan 2.1 FLF2V: the I2V pipeline with a transformer whose ``pos_embed_seq_len`` folds two CLIP images per row."""
    torch.manual_seed(0)
    config = W.wan_transformer(in_channels=2 * W.Z_DIM + 4, image_dim=W.CLIP_DIM).config
    pipe = W.wan_i2v()
    # built from the config's values: from_config would reset pos_embed_seq_len, listed in _use_default_values
    arguments = {k: v for k, v in config.items() if not k.startswith("_")} | {"pos_embed_seq_len": 2 * 17}
    pipe.transformer = WanTransformer3DModel(**arguments).eval()
    assert pipe.transformer.condition_embedder.image_embedder.pos_embed is not None
    return pipe


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_flf2v(cfg):
    """Wan 2.1 FLF2V passes 2 B rows of image tokens (each row's first and last frame, consecutive) that the model
    folds to B: they are widened two at a time. Every head of layer 1 equals the reference fold of diffusers'
    identity attention (fused and eager), and fused == eager, disable and scale=0 are exact, with 2 prompts x 2
    videos."""
    pipe = flf2v_pipe()
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states_image"].shape[0] / kw["hidden_states"].shape[0]),
        with_kwargs=True)
    try:
        inputs = W.wan_i2v_inputs(pipe, cfg=cfg) | dict(last_image=W.image(5))
        W.run(pipe, inputs)
    finally:
        handle.remove()
    assert set(seen) == {2.0}
    check_matches_reference(pipe, inputs, "1:*", module_pass(skipping_copy(pipe.transformer, 1)), scale=3.0,
                            calls="each", cond_inputs=with_cond_embeddings(inputs), kind="fp32", run=W.run, u=1.0,
                            mode="joint")
    inputs = W.wan_i2v_inputs(pipe, cfg=cfg, batch=2, videos_per_prompt=2) | dict(last_image=W.image(5))
    check_fused_eager_restore(pipe, inputs, "0:0,1:1@0.5", run=W.run)
