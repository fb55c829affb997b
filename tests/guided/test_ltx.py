"""LTX-Video 0.9.x (``LTXVideoTransformer3DModel``; ``LTXPipeline``, ``LTXImageToVideoPipeline``,
``LTXConditionPipeline``).

Self-attention ``attn1`` over the video tokens is the layer; each step makes one ``[uncond, cond]`` call (``[cond]``
without CFG). Image-to-video and the condition pipeline pass one timestep per token (0 on the conditioning tokens),
the condition pipeline per-row RoPE positions (``video_coords``). Oracles: the unpatched pipeline (``scale=0``, after
disable), the eager implementation, and a reference fold whose perturbed pass is a copy of the transformer with one
``attn1`` returning its values on SDPA (every head, ``u = 1``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers import LTXVideoTransformer3DModel

import headpag
from headpag.archs import CALL_PATTERNS, call_pattern_of
from headpag.archs.ltx import LTX
from headpag.guided import rescale
from headpag.guided.session import session_of
from support import models_ltx as L
from support.checks import check_fused_eager_restore, check_layer_table, recorded_rows
from support.reference import check_matches_reference, module_pass, sdpa_perturbed_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ("t2v", "i2v", "condition")
HEADS = "0:1,1:*@0.5"  # forks at block 0, SoftPAG on layer 1
_PIPES: dict = {}


def pipe_of(kind: str):
    if kind not in _PIPES:
        _PIPES[kind] = L.ltx(kind)
    return _PIPES[kind]


# --- layers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [dict(), dict(num_layers=3, heads=4, head_dim=4)], ids=["tiny", "3x4"])
def test_list_layers(build):
    model = L.ltx_transformer(**build)
    n = build.get("num_layers", L.LAYERS)
    heads, head_dim = build.get("heads", L.HEADS), build.get("head_dim", L.HEAD_DIM)
    layers = headpag.list_layers(model)
    assert [(x.index, x.name, x.heads, x.head_dim, x.kind, x.fork_unit) for x in layers] == [
        (i, f"transformer_blocks.{i}.attn1", heads, head_dim, "self", f"transformer_blocks.{i}") for i in range(n)]
    assert headpag.forward_units(model) == [f"transformer_blocks.{i}" for i in range(n)]
    for layer in layers:  # the block's self-attention; the text cross-attention attn2 never is a layer
        block = model.transformer_blocks[layer.index]
        assert model.get_submodule(layer.name) is block.attn1 and block.attn2.cross_attention_dim == heads * head_dim
        assert type(block.attn1.processor).__name__ in LTX.processors


@pytest.mark.parametrize("config, n", [(dict(), 28), (dict(attention_head_dim=128, cross_attention_dim=4096,
                                                           num_layers=48, caption_channels=4096), 48)],
                         ids=["2B", "13B-0.9.7"])
def test_real_checkpoint_layers(config, n):
    """diffusers' conversion configs (scripts/convert_ltx_to_diffusers.py): LTX-Video 2B (the class defaults) 28 x 32
    heads of 64; 0.9.7 / 0.9.8 13B 48 x 32 heads of 128."""
    with torch.device("meta"):
        model = LTXVideoTransformer3DModel(**config)
    layers = headpag.list_layers(model)
    head_dim = config.get("attention_head_dim", 64)
    assert len(layers) == n and {(x.heads, x.head_dim, x.kind) for x in layers} == {(32, head_dim, "self")}


def test_layer_table_and_forward_order():
    pipe = pipe_of("t2v")
    check_layer_table(pipe, [(f"transformer_blocks.{i}.attn1", f"transformer_blocks.{i}") for i in range(L.LAYERS)],
                      [L.HEADS] * L.LAYERS, [L.HEAD_DIM] * L.LAYERS, "self",
                      [f"transformer_blocks.{i}" for i in range(L.LAYERS)], lambda: L.run(pipe, L.ltx_inputs()))


@pytest.mark.parametrize("kind", KINDS)
def test_call_pattern(kind):
    assert call_pattern_of(pipe_of(kind)) is CALL_PATTERNS["uncond_cond"]


def test_scheduler_timestep():
    t = torch.tensor([1000.0, 500.0])
    per_token = torch.cat([torch.zeros(2, 4), t[:, None].expand(2, 12)], dim=1)
    assert torch.equal(LTX.scheduler_timestep(per_token), t)
    assert torch.equal(LTX.scheduler_timestep(per_token[..., None]), t)  # (B, N, 1): the long multi-prompt loop's
    assert LTX.scheduler_timestep(t) is t


# --- rows, interval ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [3.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind", ["t2v", "condition"])
def test_rows_per_call(kind, cfg):
    """Fused, layer 1: block 0 runs the base rows (``[uncond, cond]`` or ``[cond]``), block 1 and the output the
    base rows plus a twin per cond row; 2 prompts x 2 videos."""
    pipe = pipe_of(kind)
    blocks = pipe.transformer.transformer_blocks
    modules = {"block0": blocks[0].norm1, "block1": blocks[1].norm1, "norm_out": pipe.transformer.norm_out}
    with recorded_rows(modules) as log, headpag.fused(pipe, "1:0"):
        L.run(pipe, L.ltx_inputs(kind, cfg=cfg, batch=2, videos_per_prompt=2))
    base = 8 if cfg > 1 else 4
    assert log == {"block0": [base] * 2, "block1": [base + 4] * 2, "norm_out": [base + 4] * 2}


@pytest.mark.parametrize("interval, guided_steps", [((0.0, 0.5), [0]), ((0.5, 1.0), [1])])
@pytest.mark.parametrize("kind", KINDS)
def test_interval_reads_the_scheduler_timestep(kind, interval, guided_steps):
    """Image-to-video and the condition pipeline pass ``(B, N)`` timesteps with 0 on the conditioning tokens (the
    first ones): the step is still read right."""
    pipe = pipe_of(kind)
    with recorded_rows({"block0": pipe.transformer.transformer_blocks[0].norm1}) as log:
        with headpag.fused(pipe, "0:*", interval=interval):
            L.run(pipe, L.ltx_inputs(kind))
    assert log["block0"] == [3 if step in guided_steps else 2 for step in range(2)]


# --- fused == eager, effect, restore, scale=0 ---------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [3.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind, heads", [("t2v", "1:0"), ("t2v", HEADS), ("i2v", HEADS), ("condition", HEADS)])
def test_fused_eager_restore(kind, heads, cfg):
    pipe = pipe_of(kind)
    check_fused_eager_restore(pipe, L.ltx_inputs(kind, cfg=cfg), heads, run=L.run)


@pytest.mark.parametrize("cfg", [3.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind", ["t2v", "condition"])
def test_two_prompts_two_videos(kind, cfg):
    """2 prompts padded to different lengths x 2 videos."""
    inputs = L.ltx_inputs(kind, cfg=cfg, batch=2, videos_per_prompt=2, lengths=[3, 6])
    check_fused_eager_restore(pipe_of(kind), inputs, HEADS, run=L.run)


# --- an independent perturbed pass ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [3.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind, layer", [("t2v", 1), ("i2v", 0), ("condition", 1)])
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(kind, layer, cfg):
    """Every head of one layer with u=1 equals the reference fold of that ``attn1`` returning its values (on SDPA),
    fused and eager, with padded prompts; the condition pipeline's per-row ``video_coords`` reach the twins."""
    pipe = pipe_of(kind)
    perturbed = sdpa_perturbed_copy(pipe, f"transformer_blocks.{layer}.attn1", "joint", n_text=0)
    check_matches_reference(pipe, L.ltx_inputs(kind, cfg=cfg, lengths=[4]), f"{layer}:*", module_pass(perturbed),
                            scale=2.0, cfg=cfg > 1, kind="fp32", run=L.run, u=1.0, mode="joint")


# --- guidance_rescale ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def rescale_spy(pipe):
    """While headpag is enabled on ``pipe``: every ``rescale_noise_cfg`` call of its loop, as the original function
    receives it (``noise_pred_text``), with the session's unmoved cond rows of that step."""
    seen = []
    wrappers = [getattr(m, "rescale_noise_cfg") for m in rescale.loop_modules(pipe)]
    assert wrappers and all(isinstance(w, rescale._WrappedRescale) for w in wrappers)
    originals = [w.original for w in wrappers]
    record = session_of(pipe).cond_record

    def spy(original):
        def call(noise_cfg, noise_pred_text, *args, **kwargs):
            seen.append((noise_pred_text, record.cond))
            return original(noise_cfg, noise_pred_text, *args, **kwargs)
        return call

    for w, original in zip(wrappers, originals):
        w.original = spy(original)
    try:
        yield seen
    finally:
        for w, original in zip(wrappers, originals):
            w.original = original


def check_rescale_gets_the_unmoved_cond(kind: str, dtype: torch.dtype) -> None:
    pipe = L.ltx(kind, dtype=dtype)
    with headpag.fused(pipe, "1:*"), rescale_spy(pipe) as seen:
        L.run(pipe, L.ltx_inputs(kind, guidance_rescale=0.7, dtype=dtype))
    assert len(seen) == 2
    for noise_pred_text, cond in seen:
        torch.testing.assert_close(noise_pred_text.float(), cond.float(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_rescale_measures_the_unmoved_cond(kind):
    """With CFG and ``guidance_rescale`` (float32 transformer), the loop's ``rescale_noise_cfg`` measures the cond
    prediction as the denoiser made it (headpag's fold moved the one the loop holds): diffusers' PAG semantics."""
    check_rescale_gets_the_unmoved_cond(kind, torch.float32)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_guidance_rescale_in_bfloat16(kind):
    check_rescale_gets_the_unmoved_cond(kind, torch.bfloat16)
