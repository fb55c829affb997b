"""Qwen-Image (QwenImagePipeline, Img2Img, Inpaint, Edit, EditPlus): double-stream blocks with text-first joint
attention, true CFG's separate cond and uncond calls (the cond call carries the twins, the uncond call gets its
delta), ``t / 1000`` timesteps, text masks that reach every layer when a prompt is padded.

Oracles: the eager implementation; diffusers' own identity attention (``apply_layer_skip(skip_attention_scores=
True)``) for ``mode="joint"`` and a text-first masked SDPA for ``mode="image"``, each run as the perturbed pass of a
reference fold; the unpatched pipeline for ``scale=0`` / after disable."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.hooks import LayerSkipConfig, apply_layer_skip

import headpag
from headpag.archs import forward_units
from support import models as M
from support import models_qwen as Q
from support.checks import (
    ENABLE, check_fused_eager_restore, close, effect, forward_order, guided, guided_rows, recorded_rows,
)
from support.reference import check_matches_reference, module_pass, sdpa_perturbed_copy
from support.tolerances import MIN_EFFECT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = list(Q.PIPELINES)
HEADS = "1:0,2:3@0.5"  # block 0 runs the base rows only; a soft head in the last block


@pytest.fixture(scope="module")
def pipes():
    with Q.small_edit_images():
        yield {kind: Q.pipeline(kind) for kind in KINDS}


def batch(kind: str, **kw) -> dict:
    """2 prompts x 2 images (EditPlus takes one prompt: 1 x 2)."""
    return Q.inputs(kind, prompts=1 if kind == "edit_plus" else 2, images_per_prompt=2, **kw)


# --- layers --------------------------------------------------------------------------------------------------------


def test_list_layers():
    torch.manual_seed(0)
    model = Q.transformer()
    layers = headpag.list_layers(model)
    assert [(x.index, x.name, x.fork_unit) for x in layers] == [
        (i, f"transformer_blocks.{i}.attn", f"transformer_blocks.{i}") for i in range(Q.LAYERS)]
    assert {(x.heads, x.head_dim, x.kind) for x in layers} == {(Q.HEADS, Q.HEAD_DIM, "joint")}
    assert forward_units(model) == [f"transformer_blocks.{i}" for i in range(Q.LAYERS)]
    assert {type(model.get_submodule(x.name).processor).__name__ for x in layers} == {"QwenDoubleStreamAttnProcessor2_0"}
    # forward order == index order
    calls = forward_order({x.name: model.get_submodule(x.name) for x in layers}, lambda: model(
        hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, Q.TEXT_LEN, Q.TEXT_DIM),
        timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]]))
    assert calls == [x.name for x in layers]


def test_list_layers_of_the_real_config():
    """diffusers' defaults are Qwen-Image's config: 60 blocks of 24 heads of 128 (meta device: no weights)."""
    with torch.device("meta"):
        model = QwenImageTransformer2DModel()
    layers = headpag.list_layers(model)
    assert len(layers) == 60 and {(x.heads, x.head_dim) for x in layers} == {(24, 128)}


# --- fused == eager == restored ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("true_cfg_scale", [4.0, 1.0], ids=["true-cfg", "no-cfg"])
@pytest.mark.parametrize("kind", KINDS)
def test_qwenimage(pipes, kind, true_cfg_scale, mode):
    with Q.small_edit_images():
        check_fused_eager_restore(pipes[kind], batch(kind, true_cfg_scale=true_cfg_scale), HEADS, mode=mode)


@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_calls_and_rows(pipes, kind):
    """Per step: the cond call carries one twin per row from the first selected block on, the true-CFG uncond
    call none; the edit pipelines' denoiser sees the noisy and the reference image tokens."""
    pipe = pipes[kind]
    blocks = {f"block{i}": pipe.transformer.transformer_blocks[i].attn for i in range(2)}
    with Q.small_edit_images(), recorded_rows(blocks) as log, headpag.fused(pipe, "1:0"):
        pipe(**batch(kind, steps=2), generator=torch.Generator().manual_seed(0))
    assert log["block0"] == [4, 4, 4, 4]
    assert log["block1"] == [8, 4, 8, 4]
    image_tokens = (Q.SIZE // 8) ** 2
    seen = []
    handle = pipe.transformer.img_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        with Q.small_edit_images():
            Q.run(pipe, batch(kind, steps=1))
    finally:
        handle.remove()
    assert seen == [image_tokens * (2 if kind == "edit" else 1)] * 2


def test_interval_reads_the_scheduler_timestep(pipes):
    """The pipelines pass t / 1000: interval (0, 0.5) of 4 steps guides steps 0 and 1 only."""
    pipe = pipes["t2i"]
    block1 = {"block1": pipe.transformer.transformer_blocks[1].attn}
    log, _ = guided_rows(pipe, block1, "fused", "1:0", batch("t2i", steps=4), run=Q.run, interval=(0.0, 0.5))
    assert log["block1"] == [8, 4, 8, 4, 4, 4, 4, 4]


# --- against independent perturbed passes --------------------------------------------------------------------------


def perturbed_copy(pipe, layer: int, mode: str) -> torch.nn.Module:
    """diffusers' identity attention (joint) or the text-first masked SDPA (image, the processor's ``[text, image]``
    order) on ``transformer_blocks[layer]`` of a copy of the transformer."""
    if mode == "image":
        return sdpa_perturbed_copy(pipe, f"transformer_blocks.{layer}.attn", mode, n_text=Q.TEXT_LEN, text="first")
    model = copy.deepcopy(pipe.transformer)
    apply_layer_skip(model, LayerSkipConfig(indices=[layer], fqn="transformer_blocks", skip_attention=False,
                                            skip_attention_scores=True, skip_ff=False))
    return model


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("true_cfg_scale", [4.0, 1.0], ids=["true-cfg", "no-cfg"])
@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(pipes, kind, true_cfg_scale, mode):
    """Every head of layer 1 with u=1 equals the reference fold of diffusers' identity attention (joint) or of a
    text-first masked SDPA (image) on that layer: checks the text-first order, the fold into both true-CFG calls
    and the scale."""
    pipe = pipes[kind]
    call = batch(kind, true_cfg_scale=true_cfg_scale)
    with Q.small_edit_images():  # the cond call first, then true CFG's uncond call
        check_matches_reference(pipe, call, "1:*", module_pass(perturbed_copy(pipe, 1, mode)), scale=2.0,
                                cfg=true_cfg_scale > 1, calls="separate", mode=mode)


# --- masks and unsupported configurations --------------------------------------------------------------------------


def padded(rows: int) -> torch.Tensor:
    mask = torch.ones(rows, Q.TEXT_LEN, dtype=torch.long)
    mask[-1, 3:] = 0
    return mask


@pytest.mark.parametrize("mode", ["joint", "image"])
def test_padded_prompt_matches_an_independent_perturbed_pass(pipes, mode):
    """A padded prompt reaches every layer as a key mask (all-ones masks are dropped by the pipeline, so only padded
    prompts carry one): every head of layer 1 equals the reference fold of diffusers' identity attention (joint) or
    of a text-first SDPA under the call's mask (image), with true CFG."""
    pipe = pipes["t2i"]
    call = batch("t2i", mask=padded(2), true_cfg_scale=4.0)
    check_matches_reference(pipe, call, "1:*", module_pass(perturbed_copy(pipe, 1, mode)), scale=2.0, cfg=True,
                            calls="separate", mode=mode)
    fused, eager = (guided(pipe, execution, HEADS, call) for execution in ENABLE)
    close(fused, eager, "families")


def test_padded_negative_prompt_is_fine(pipes):
    """The true-CFG uncond call is not forked (it gets the cond call's delta), so its mask never meets the
    perturbed attention."""
    pipe = pipes["t2i"]
    call = batch("t2i", negative_mask=padded(2))
    plain = M.run(pipe, call)
    fused, eager = (guided(pipe, execution, HEADS, call) for execution in ENABLE)
    close(fused, eager, "families")
    assert effect(fused, plain) > MIN_EFFECT


def test_zero_cond_t_is_refused():
    """Qwen-Image-Edit-2511's zero_cond_t doubles the timestep embedding's rows: refused before anything is
    attached; its layers are still listed."""
    pipe = Q.pipeline("edit_plus", zero_cond_t=True)
    assert len(headpag.list_layers(pipe)) == Q.LAYERS
    with pytest.raises(ValueError, match="zero_cond_t"):
        headpag.enable_fused(pipe, "1:0")
    assert not headpag.is_enabled(pipe)
    assert not hasattr(pipe.transformer, "_diffusers_hook") or not pipe.transformer._diffusers_hook.hooks
