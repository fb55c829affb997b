"""FLUX.2: one index space over double- and single-stream blocks, modulation tensors computed once outside the
blocks and passed into each (per-row block arguments), the fused attention + MLP ("parallel") processor of the
single blocks, the distilled guidance embedding (``Flux2Pipeline``) and klein's true CFG in a second call
(``Flux2KleinPipeline``). No diffusers PAG pipeline exists for FLUX.2: the oracle is the eager implementation, and
the unpatched pipeline for scale=0 / after disable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2KVAttnProcessor
from torch.overrides import TorchFunctionMode

import headpag
from support import models as M
from support import models_flux2 as F2
from support.checks import check_fused_eager_restore, effect, guided, patched, recorded_rows
from support.tolerances import MIN_EFFECT, close

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def flux2_pipe():
    return F2.flux2()


@pytest.fixture(scope="module")
def klein_pipe():
    return F2.klein()


def test_list_layers():
    model = F2.flux2_transformer(num_layers=2, num_single_layers=3, heads=4, head_dim=8)
    layers = headpag.list_layers(model)
    expected = [(f"transformer_blocks.{i}", "Flux2AttnProcessor") for i in range(2)]
    expected += [(f"single_transformer_blocks.{j}", "Flux2ParallelSelfAttnProcessor") for j in range(3)]
    assert [layer.index for layer in layers] == list(range(5))
    assert [(layer.name, layer.fork_unit) for layer in layers] == [(f"{unit}.attn", unit) for unit, _ in expected]
    assert [type(model.get_submodule(layer.name).processor).__name__ for layer in layers] == [p for _, p in expected]
    assert {(layer.heads, layer.head_dim, layer.kind) for layer in layers} == {(4, 8, "joint")}
    assert headpag.archs.forward_units(model) == [unit for unit, _ in expected]


@pytest.mark.parametrize("mode", ["joint", "image"])
def test_flux2(flux2_pipe, mode):
    """2 prompts x 2 images, distilled guidance embedding per row; a double and a single block selected."""
    check_fused_eager_restore(flux2_pipe, F2.flux2_inputs(batch=2, num_images_per_prompt=2), "0:1,2:0@0.5", mode=mode)


@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["true-cfg", "no-cfg"])
@pytest.mark.parametrize("mode", ["joint", "image"])
def test_klein(klein_pipe, cfg, mode):
    check_fused_eager_restore(klein_pipe, F2.klein_inputs(batch=2, num_images_per_prompt=2, cfg=cfg), "0:0,1:*",
                              mode=mode)


def test_klein_counts_calls(klein_pipe):
    """With true CFG each step makes two denoiser calls: the cond call carries the twins, the uncond call not."""
    inputs = F2.klein_inputs(batch=1, cfg=4.0, steps=2)
    with recorded_rows({"block0": klein_pipe.transformer.transformer_blocks[0]}) as log:
        with headpag.fused(klein_pipe, "0:0"):
            M.run(klein_pipe, inputs)
    assert log["block0"] == [2, 1, 2, 1]


def test_fork_at_a_single_block(flux2_pipe):
    """Heads in the last single block only: every block before it runs the base rows (its per-row modulation
    narrowed with them), the selected block the base rows and the twins."""
    den = flux2_pipe.transformer  # a block's attention module sees the rows the block runs
    blocks = {"double": den.transformer_blocks[0].attn, "single0": den.single_transformer_blocks[0].attn,
              "single1": den.single_transformer_blocks[1].attn}
    inputs = F2.flux2_inputs(batch=2, steps=1)
    with recorded_rows(blocks) as log:
        out = guided(flux2_pipe, "fused", "2:1", inputs)
    assert log == {"double": [2], "single0": [2], "single1": [4]}
    assert effect(out, M.run(flux2_pipe, inputs)) > MIN_EFFECT


def test_interval_reads_the_pipelines_timestep(flux2_pipe):
    """FLUX.2 passes t / 1000: only the first of three steps lies in [0, 1/3)."""
    inputs = F2.flux2_inputs(batch=1, steps=3)
    with recorded_rows({"block0": flux2_pipe.transformer.transformer_blocks[0]}) as log:
        guided(flux2_pipe, "fused", "0:0", inputs, interval=(0.0, 0.3))
    assert log["block0"] == [2, 1, 1]


def test_kv_cache_processor_is_refused(klein_pipe):
    """Klein-KV's processor makes several attention calls per layer in its extract mode: not a default processor."""
    attn = klein_pipe.transformer.transformer_blocks[0].attn
    attn.set_processor(Flux2KVAttnProcessor())
    try:
        with pytest.raises(ValueError, match="Flux2KVAttnProcessor"):
            with patched(klein_pipe, "fused", "0:0"):
                pass
        with patched(klein_pipe, "fused", "1:0"):  # other layers stay usable
            pass
    finally:
        attn.set_processor(Flux2AttnProcessor())


# --- against an independent perturbed pass ---------------------------------------------------------------------


class TextFirstIdentity(TorchFunctionMode):
    """The perturbed attention written independently on SDPA ``(B, H, N, D)``: ``joint`` returns the values (the
    identity map); ``image`` masks every image-image pair off the diagonal, the *first* ``n_text`` tokens being the
    text (FLUX.2's ``[text, image]`` order in both block kinds)."""

    def __init__(self, mode: str, n_text: int):
        super().__init__()
        self.mode, self.n_text = mode, n_text

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(("query", "key", "value"), args)) | kwargs
        assert call.get("attn_mask") is None
        q, k, v = call["query"], call["key"], call["value"]
        if self.mode == "joint":
            return v.clone()
        n = q.shape[-2]
        image = torch.arange(n) >= self.n_text
        block = image[:, None] & image[None, :] & ~torch.eye(n, dtype=torch.bool)
        return func(q, k, v, attn_mask=torch.zeros(n, n, dtype=q.dtype).masked_fill(block, float("-inf")))


def perturbed_copy(pipe, attention: str, mode: str) -> torch.nn.Module:
    model = copy.deepcopy(pipe.transformer)
    attn = model.get_submodule(attention)
    original = attn.forward
    # SDPA whatever the global backend (diffusers' set_attention_backend leaves its backend active after a reset)
    attn.processor._attention_backend = "native"

    def forward(*args, **kwargs):
        with TextFirstIdentity(mode, F2.TEXT_LEN):
            return original(*args, **kwargs)

    attn.forward = forward
    return model


def reference_fold(pipe, perturbed: torch.nn.Module, scale: float, cfg: bool):
    """A forward hook on the plain transformer: the cond call (the first of a step) gets ``delta = w * (cond -
    perturbed(cond inputs))``; with true CFG the next call (the uncond one) gets the same delta."""
    state = {"calls": 0}

    def hook(module, args, kwargs, output):
        uncond = cfg and state["calls"] % 2 == 1
        state["calls"] += 1
        if not uncond:
            state["delta"] = scale * (output[0] - perturbed(*args, **kwargs)[0])
        return (output[0] + state["delta"], *output[1:])

    return pipe.transformer.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize(("kind", "layer", "attention", "cfg"), [
    ("flux2", 0, "transformer_blocks.0.attn", 1.0),
    ("flux2", 2, "single_transformer_blocks.1.attn", 1.0),
    ("klein", 1, "single_transformer_blocks.0.attn", 4.0),
], ids=["dev-double", "dev-single", "klein-single-cfg"])
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(flux2_pipe, klein_pipe, kind, layer, attention,
                                                                     cfg, mode):
    """Every head of one layer with u=1 equals the reference fold of a text-first identity SDPA on that layer:
    checks the text's place in the double and the parallel single blocks, the layer index space and the fold into
    klein's separate uncond call."""
    pipe = flux2_pipe if kind == "flux2" else klein_pipe
    inputs = F2.flux2_inputs(batch=2) if kind == "flux2" else F2.klein_inputs(batch=2, cfg=cfg)
    handle = reference_fold(pipe, perturbed_copy(pipe, attention, mode), scale=2.0, cfg=cfg > 1)
    try:
        expected = M.run(pipe, inputs)
    finally:
        handle.remove()
    assert effect(expected, M.run(pipe, inputs)) > MIN_EFFECT
    for execution in ("fused", "eager"):
        close(guided(pipe, execution, f"{layer}:*", inputs, scale=2.0, mode=mode), expected, "families", execution)
