"""FLUX.2: one index space over double- and single-stream blocks, modulation tensors computed once outside the
blocks and passed into each (per-row block arguments), the fused attention + MLP ("parallel") processor of the
single blocks, the distilled guidance embedding (``Flux2Pipeline``) and klein's true CFG in a second call
(``Flux2KleinPipeline``). No diffusers PAG pipeline exists for FLUX.2: the oracle is the eager implementation, and
the unpatched pipeline for scale=0 / after disable."""

from __future__ import annotations

import pytest
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2KVAttnProcessor

import headpag
from support import models as M
from support import models_flux2 as F2
from support.checks import check_fused_eager_restore, effect, guided_rows, patched
from support.reference import check_matches_reference, module_pass, sdpa_perturbed_copy
from support.tolerances import MIN_EFFECT

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
    inputs = F2.klein_inputs(batch=2, num_images_per_prompt=2, cfg=cfg)
    check_fused_eager_restore(klein_pipe, inputs, "0:0,1:*", mode=mode)


def test_klein_counts_calls(klein_pipe):
    """With true CFG each step makes two denoiser calls: the cond call carries the twins, the uncond call not."""
    block0 = {"block0": klein_pipe.transformer.transformer_blocks[0]}
    log, _ = guided_rows(klein_pipe, block0, "fused", "0:0", F2.klein_inputs(batch=1, cfg=4.0, steps=2))
    assert log["block0"] == [2, 1, 2, 1]


def test_fork_at_a_single_block(flux2_pipe):
    """Heads in the last single block only: every block before it runs the base rows (its per-row modulation
    narrowed with them), the selected block the base rows and the twins."""
    den = flux2_pipe.transformer  # a block's attention module sees the rows the block runs
    blocks = {"double": den.transformer_blocks[0].attn, "single0": den.single_transformer_blocks[0].attn,
              "single1": den.single_transformer_blocks[1].attn}
    inputs = F2.flux2_inputs(batch=2, steps=1)
    log, out = guided_rows(flux2_pipe, blocks, "fused", "2:1", inputs)
    assert log == {"double": [2], "single0": [2], "single1": [4]}
    assert effect(out, M.run(flux2_pipe, inputs)) > MIN_EFFECT


def test_interval_reads_the_pipelines_timestep(flux2_pipe):
    """FLUX.2 passes t / 1000: only the first of three steps lies in [0, 1/3)."""
    block0 = {"block0": flux2_pipe.transformer.transformer_blocks[0]}
    log, _ = guided_rows(flux2_pipe, block0, "fused", "0:0", F2.flux2_inputs(batch=1, steps=3), interval=(0.0, 0.3))
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
    # FLUX.2's [text, image] order in both block kinds; the cond call first, then klein's uncond call
    perturbed = module_pass(sdpa_perturbed_copy(pipe, attention, mode, n_text=F2.TEXT_LEN, text="first"))
    check_matches_reference(pipe, inputs, f"{layer}:*", perturbed, scale=2.0, cfg=cfg > 1, calls="separate",
                            mode=mode)
