"""HiDream-I1 (HiDreamImageTransformer2DModel; HiDreamImagePipeline): one index space over the double-stream then
the single-stream blocks, image tokens first and ``n_t5 + 2 n_llama`` text tokens last in every layer, the Llama
hidden-state stack ``(L, B, n, C)`` whose rows are its dim 1, one call per step with rows ``[uncond, cond]``, the
scheduler's timesteps as they are, a negated prediction before CFG. No diffusers PAG pipeline exists for HiDream:
the oracles are an independent perturbed pass (the identity or a text-last SDPA on one layer of a copy of the
denoiser), the eager implementation, and the unpatched pipeline for scale=0 / after disable."""

from __future__ import annotations

import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel
from diffusers.models.transformers.transformer_hidream_image import HiDreamAttnProcessor

import headpag
from support import models as M
from support import models_hidream as H
from support.checks import check_fused_eager_restore, check_layer_table, effect, guided, guided_rows, patched
from support.models_flux_family import routed_calls
from support.reference import check_matches_reference, sdpa_perturbed_copy
from support.tolerances import MIN_EFFECT, close

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS = "0:1,2:0@0.5"  # layer 0 is the double block, 1 and 2 the single blocks
UNITS = ["double_stream_blocks.0", "single_stream_blocks.0", "single_stream_blocks.1"]


@pytest.fixture(scope="module")
def pipe():
    return H.hidream()


def test_list_layers(pipe):
    """Names, fork units, heads, head dim and kind; the forward loop starts the attention modules in that order."""
    expected = [(f"{unit}.block.attn1", unit) for unit in UNITS]
    check_layer_table(pipe, expected, [H.HEADS] * 3, [H.HEAD_DIM] * 3, "joint", UNITS,
                      lambda: M.run(pipe, H.hidream_inputs(prompts=1, steps=1)))
    pattern = headpag.archs.call_pattern_of(pipe)
    assert (pattern.name, dict(pattern.cfg_off)) == ("uncond_cond", {"guidance_scale": 1.0})


def test_real_checkpoint_layers():
    """HiDream-I1 (Full / Dev / Fast): 16 double + 32 single blocks of 20 heads of 128."""
    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel(**H.REAL_CONFIG)
    layers = headpag.list_layers(model)
    assert len(layers) == 48 and {(x.heads, x.head_dim, x.kind) for x in layers} == {(20, 128, "joint")}
    assert (layers[15].name, layers[16].name) == ("double_stream_blocks.15.block.attn1",
                                                  "single_stream_blocks.0.block.attn1")
    assert layers[47].fork_unit == "single_stream_blocks.31"


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_fused_eager_restore(pipe, cfg, mode):
    check_fused_eager_restore(pipe, H.hidream_inputs(cfg=cfg), HEADS, mode=mode)


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_two_prompts_two_images(pipe, cfg):
    check_fused_eager_restore(pipe, H.hidream_inputs(prompts=2, images_per_prompt=2, cfg=cfg), "1:*,2:1",
                              mode="image")


def test_non_square_image(pipe):
    """16x8 pixels (the pipeline makes it 20x8: 10 image tokens): the model pads the image tokens to max_seq = 16 and
    zeroes the padded keys (hidden_states_masks, per row, built inside the forward)."""
    inputs = H.hidream_inputs(prompts=1, width=8)
    assert M.run(pipe, inputs).shape[-2:] == (10, 4)
    check_fused_eager_restore(pipe, inputs, "0:*,2:1", mode="image")


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_rows_per_call(pipe, cfg):
    """One call per step. The per-row inputs get one twin per cond row at entry: every caption projection (the
    three Llama layers the blocks read and the T5 one) sees the guided call's rows, so the Llama stack was widened
    along its rows; the double block runs before the fork (layer 1 is single block 0) on the base rows only. Eager
    runs the call as given, then the cond rows alone (the stack narrowed along its rows too)."""
    den = pipe.transformer
    modules = {f"caption{i}": p for i, p in enumerate(den.caption_projection)}
    modules |= {"double": den.double_stream_blocks[0].block.norm1_i, "single": den.single_stream_blocks[1].block.norm1_i}
    inputs = H.hidream_inputs(prompts=1, cfg=cfg, steps=2)
    base = 2 if cfg > 1 else 1
    log, _ = guided_rows(pipe, modules, "fused", "1:0", inputs)
    assert log == {name: [base] * 2 if name == "double" else [base + 1] * 2 for name in modules}
    log, _ = guided_rows(pipe, modules, "eager", "1:0", inputs)
    assert log == dict.fromkeys(modules, [base, 1] * 2)


def test_interval_reads_the_scheduler_timestep(pipe):
    """The pipeline passes the scheduler's t as is: of three steps only the first lies in [0, 0.3), the last two in
    [0.3, 1)."""
    single = {"single": pipe.transformer.single_stream_blocks[0].block.norm1_i}
    inputs = H.hidream_inputs(prompts=1, cfg=5.0, steps=3)
    log, _ = guided_rows(pipe, single, "fused", "1:0", inputs, interval=(0.0, 0.3))
    assert log["single"] == [3, 2, 2]
    log, _ = guided_rows(pipe, single, "fused", "1:0", inputs, interval=(0.3, 1.0))
    assert log["single"] == [2, 3, 3]


def test_text_tokens_last(pipe):
    """Every layer is told n_text = n_t5 + 2 n_llama, text last. The double block's joint sequence ends with its text
    stream's values; single block 0's sequence is [image, t5, last Llama layer] carried from the double block's
    outputs, then its own Llama layer (caption projection 1) at the end."""
    den = pipe.transformer
    double, single = den.double_stream_blocks[0].block, den.single_stream_blocks[0].block
    seen = {}  # the first call's (the one guided call's) tensors

    def keep(key, value) -> None:
        seen.setdefault(key, value)

    handles = [
        double.attn1.to_v_t.register_forward_hook(lambda m, a, out: keep("text_v", out)),
        double.register_forward_hook(lambda m, a, out: keep("double_out", out)),
        single.register_forward_pre_hook(lambda m, a, kw: keep("single_in", kw["hidden_states"]), with_kwargs=True),
        den.caption_projection[1].register_forward_hook(lambda m, a, out: keep("llama_1", out)),
    ]
    try:
        with routed_calls() as calls, headpag.fused(pipe, "0:0,1:1", mode="image"):
            M.run(pipe, H.hidream_inputs(prompts=1, cfg=1.0, steps=1))
    finally:
        for h in handles:
            h.remove()
    assert [c["layer"] for c in calls] == [f"{u}.block.attn1" for u in UNITS[:2]]
    for c in calls:
        assert (c["n_text"], c["text_first"], c["v"].shape[:2]) == (H.N_TEXT, False, (2, H.N_IMAGE + H.N_TEXT))
    assert torch.equal(calls[0]["v"][:, -H.N_TEXT:], seen["text_v"].unflatten(-1, (H.HEADS, -1)))
    image, text = seen["double_out"]
    carried = H.T5_LEN + H.LLAMA_LEN
    assert torch.equal(seen["single_in"], torch.cat([image, text[:, :carried], seen["llama_1"]], dim=1))


def _cond_llama_pass(model):
    """The perturbed pass of the reference fold on the cond rows: the fold narrows tensors along their leading dim,
    so the Llama stack (rows along dim 1) is narrowed here to the last rows (``[uncond, cond]``)."""

    def perturbed(args, kwargs):
        rows = kwargs["hidden_states"].shape[0]
        llama = kwargs["encoder_hidden_states_llama3"]
        assert llama.shape[0] == H.LLAMA_STACK  # the stack as the pipeline passed it, rows along dim 1
        return model(*args, **dict(kwargs, encoder_hidden_states_llama3=llama[:, -rows:]))[0]

    return perturbed


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("layer, attention", [(0, "double_stream_blocks.0.block.attn1"),
                                              (2, "single_stream_blocks.1.block.attn1")], ids=["double", "single"])
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(pipe, layer, attention, cfg, mode):
    """Every head of one layer with u=1 equals the reference fold of the identity (joint) or of a text-last SDPA with
    the image-image block masked off the diagonal (image, n_text = n_t5 + 2 n_llama) on that layer of a copy of the
    denoiser; the delta folded into the uncond and cond rows of the one call."""
    perturbed = _cond_llama_pass(sdpa_perturbed_copy(pipe, attention, mode, n_text=H.N_TEXT, text="last"))
    check_matches_reference(pipe, H.hidream_inputs(prompts=2, cfg=cfg, steps=2), f"{layer}:*", perturbed, scale=2.0,
                            cfg=cfg > 1, calls="one", cond="last", mode=mode, kind="fp32")


def test_patchified_input_with_img_sizes_list(pipe):
    """A caller that patchifies itself (3-D hidden_states with hidden_states_masks, img_ids and img_sizes as a list of
    (h, w) pairs) is guided like the model's own patchify of the 4-D latents: the sizes become a per-row tensor."""
    M.run(pipe, H.hidream_inputs(prompts=1, cfg=5.0, width=8))  # the pipeline's CFG state and timesteps
    den = pipe.transformer
    latents = torch.randn(2, 4, 10, 4, generator=torch.Generator().manual_seed(3))
    x, masks, sizes, ids = den.patchify(latents)
    assert masks is not None and x.shape[1] == den.max_seq
    text = H.hidream_inputs(prompts=2, cfg=1.0)  # two rows: [uncond, cond] of the call
    kwargs = dict(timesteps=pipe.scheduler.timesteps[0].expand(2), encoder_hidden_states_t5=text["prompt_embeds_t5"],
                  encoder_hidden_states_llama3=text["prompt_embeds_llama3"], pooled_embeds=text["pooled_prompt_embeds"],
                  return_dict=False)
    patchified = dict(kwargs, hidden_states=x, hidden_states_masks=masks, img_ids=ids,
                      img_sizes=[tuple(int(v) for v in s) for s in sizes])
    with torch.no_grad():
        plain = den(hidden_states=latents, **kwargs)[0]
        assert torch.equal(den(**patchified)[0], plain)
        outs = {}
        for execution in ("fused", "eager"):
            with patched(pipe, execution, "0:*,2:1"):
                outs[execution] = den(**patchified)[0]
                assert torch.equal(den(hidden_states=latents, **kwargs)[0], outs[execution])
    assert effect(outs["fused"], plain) > MIN_EFFECT
    close(outs["fused"], outs["eager"], "fp32")


def test_custom_processor_is_refused(pipe):
    """Only HiDream's default processor is perturbed: another one on a selected layer raises at enable."""

    class CustomProcessor(HiDreamAttnProcessor):
        pass

    attn = pipe.transformer.single_stream_blocks[0].block.attn1
    default = attn.processor
    attn.processor = CustomProcessor()
    try:
        with pytest.raises(ValueError, match="single_stream_blocks.0.block.attn1 has processor CustomProcessor"):
            headpag.enable_fused(pipe, "1:0")
        assert not headpag.is_enabled(pipe)
        guided(pipe, "fused", "0:0,2:1", H.hidream_inputs(prompts=1, steps=1))  # other layers are fine
    finally:
        attn.processor = default
