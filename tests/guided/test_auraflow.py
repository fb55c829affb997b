"""AuraFlow (AuraFlowPipeline): MMDiT blocks then single DiT blocks in one index space, text-first joint attention
whose text side starts with the model's 8 register tokens, one call per step with rows ``[uncond, cond]`` under CFG
(a local of the pipeline's ``__call__``), ``t / 1000`` timesteps.

Oracles: the eager implementation; a masked SDPA (every off-diagonal pair masked, for ``mode="joint"``; among the
image tokens after the 8 register + text tokens, for ``mode="image"``) run as the perturbed pass of a reference
fold; the unpatched pipeline for ``scale=0`` / after disable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import AuraFlowTransformer2DModel
from torch.overrides import TorchFunctionMode

import headpag
from headpag.archs import forward_units
from support import models as M
from support import models_auraflow as A
from support.checks import ENABLE, check_fused_eager_restore, close, effect, guided, recorded_rows
from support.tolerances import MIN_EFFECT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: a joint block and a single block; block 0 runs the base rows only; a soft head
HEADS = "1:0,3:2@0.5"
NAMES = [f"joint_transformer_blocks.{i}" for i in range(A.MMDIT)] + \
        [f"single_transformer_blocks.{j}" for j in range(A.SINGLE)]


@pytest.fixture(scope="module")
def pipe():
    return A.pipeline()


# --- layers --------------------------------------------------------------------------------------------------------


def test_list_layers():
    torch.manual_seed(0)
    model = A.transformer()
    layers = headpag.list_layers(model)
    assert [(x.index, x.name, x.fork_unit) for x in layers] == [(i, f"{n}.attn", n) for i, n in enumerate(NAMES)]
    assert {(x.heads, x.head_dim, x.kind) for x in layers} == {(A.HEADS, A.HEAD_DIM, "joint")}
    assert forward_units(model) == NAMES
    assert {type(model.get_submodule(x.name).processor).__name__ for x in layers} == {"AuraFlowAttnProcessor2_0"}
    calls = []
    handles = [model.get_submodule(x.name).register_forward_pre_hook(lambda m, a, n=x.name: calls.append(n))
               for x in layers]
    try:
        with torch.no_grad():
            model(torch.randn(1, A.LATENT, 8, 8), encoder_hidden_states=torch.randn(1, A.TEXT_LEN, A.TEXT_DIM),
                  timestep=torch.tensor([0.5]))
    finally:
        for h in handles:
            h.remove()
    assert calls == [x.name for x in layers]


def test_list_layers_of_the_real_config():
    """diffusers' defaults are AuraFlow's config: 4 + 32 blocks of 12 heads of 256 (meta device: no weights)."""
    with torch.device("meta"):
        model = AuraFlowTransformer2DModel()
    layers = headpag.list_layers(model)
    assert len(layers) == 36 and {(x.heads, x.head_dim) for x in layers} == {(12, 256)}
    assert layers[4].name == "single_transformer_blocks.0.attn"


# --- fused == eager == restored ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("heads", [HEADS, "2:*"], ids=["joint-and-single", "single-only"])
@pytest.mark.parametrize("guidance_scale", [3.5, 1.0], ids=["cfg", "no-cfg"])
def test_auraflow(pipe, guidance_scale, heads, mode):
    """2 prompts x 2 images, CFG on and off; a fork in a joint block and in the first single block."""
    check_fused_eager_restore(pipe, A.inputs(guidance_scale=guidance_scale), heads, mode=mode)


def test_calls_and_rows(pipe):
    """One call per step: [uncond, cond] under CFG (8 rows), twins of the 4 cond rows from the fork unit on."""
    blocks = {n: pipe.transformer.get_submodule(f"{n}.attn") for n in ("joint_transformer_blocks.0",
                                                                       "joint_transformer_blocks.1",
                                                                       "single_transformer_blocks.1")}
    with recorded_rows(blocks) as log, headpag.fused(pipe, "1:0"):
        M.run(pipe, A.inputs())
    assert list(log.values()) == [[8, 8], [12, 12], [12, 12]]
    with recorded_rows(blocks) as log, headpag.fused(pipe, "3:0"):
        M.run(pipe, A.inputs(guidance_scale=1.0))
    assert list(log.values()) == [[4, 4], [4, 4], [8, 8]]


def test_interval_reads_the_scheduler_timestep(pipe):
    """The pipeline passes t / 1000: interval (0, 0.5) of 4 steps guides steps 0 and 1 only."""
    with recorded_rows({"b1": pipe.transformer.joint_transformer_blocks[1].attn}) as log:
        with headpag.fused(pipe, "1:0", interval=(0.0, 0.5)):
            M.run(pipe, A.inputs(steps=4))
    assert log["b1"] == [12, 12, 8, 8]


# --- against independent perturbed passes --------------------------------------------------------------------------


def reference_fold(pipe, perturbed: torch.nn.Module, scale: float, cfg: bool):
    """A forward hook on the plain transformer: ``delta = w * (cond - perturbed(cond inputs))`` from the cond rows
    (the second half under CFG) added to every row."""

    def hook(module, args, kwargs, output):
        sample = output[0]
        n = sample.shape[0]
        cond = slice(n // 2, n) if cfg else slice(0, n)
        x = args[0][cond]
        kw = dict(kwargs, encoder_hidden_states=kwargs["encoder_hidden_states"][cond],
                  timestep=kwargs["timestep"][cond])
        delta = scale * (sample[cond] - perturbed(x, **kw)[0])
        return (sample + (delta.repeat(2, 1, 1, 1) if cfg else delta), *output[1:])

    return pipe.transformer.register_forward_hook(hook, with_kwargs=True)


class TextFirstImageIdentity(TorchFunctionMode):
    """The identity attention written independently: SDPA with every pair off the diagonal masked among the tokens
    from ``n_text`` on (``mode="image"``: the first ``n_text`` tokens being the register and text tokens; 0: the
    whole joint sequence, ``mode="joint"``; diffusers' ``skip_attention_scores`` does not know AuraFlow's
    processor)."""

    def __init__(self, n_text: int):
        super().__init__()
        self.n_text = n_text

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(("query", "key", "value"), args)) | kwargs
        assert call.get("attn_mask") is None
        q = call["query"]
        n = q.shape[-2]
        image = torch.arange(n) >= self.n_text
        block = image[:, None] & image[None, :] & ~torch.eye(n, dtype=torch.bool)
        mask = torch.zeros(n, n, dtype=q.dtype).masked_fill(block, float("-inf"))
        return func(q, call["key"], call["value"], attn_mask=mask, scale=call.get("scale"))


def perturbed_copy(pipe, layer: int, mode: str) -> torch.nn.Module:
    model = copy.deepcopy(pipe.transformer)
    attn = model.get_submodule(f"{NAMES[layer]}.attn")
    original = attn.forward

    def forward(*args, **kwargs):
        with TextFirstImageIdentity(0 if mode == "joint" else A.REGISTER + A.TEXT_LEN):
            return original(*args, **kwargs)

    attn.forward = forward
    return model


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("layer", [1, 2], ids=["joint-block", "single-block"])
@pytest.mark.parametrize("guidance_scale", [3.5, 1.0], ids=["cfg", "no-cfg"])
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(pipe, guidance_scale, layer, mode):
    """Every head of a layer with u=1 equals the reference fold of diffusers' identity attention (joint) or of a
    masked SDPA whose text side is the 8 register tokens plus the text (image): checks the register-token offset,
    the [uncond, cond] rows and the scale."""
    call = A.inputs(guidance_scale=guidance_scale)
    handle = reference_fold(pipe, perturbed_copy(pipe, layer, mode), scale=2.0, cfg=guidance_scale > 1)
    try:
        expected = M.run(pipe, call)
    finally:
        handle.remove()
    plain = M.run(pipe, call)
    assert effect(expected, plain) > MIN_EFFECT
    for execution in ENABLE:
        close(guided(pipe, execution, f"{layer}:*", call, scale=2.0, mode=mode), expected, "families", execution)
