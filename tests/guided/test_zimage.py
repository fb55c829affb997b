"""Z-Image: the denoiser takes and returns Python lists of per-row tensors (rows [positive..., negative...] in one
call under CFG), ``(1000 - t) / 1000`` timesteps, caption tokens after the image tokens in the unified sequence,
single-modality refiner blocks before the main layers, CFG truncation that drops the negative rows mid-run.
No diffusers PAG pipeline exists for Z-Image: the oracle is the eager implementation, and the unpatched pipeline
for scale=0 / after disable."""

from __future__ import annotations

import pytest

import headpag
from headpag.archs import forward_units
from support import models as M
from support import models_zimage as Z
from support.checks import check_fused_eager_restore, effect, guided, guided_rows, patched, recorded_rows
from support.reference import check_matches_reference, module_pass, sdpa_perturbed_copy
from support.tolerances import MIN_EFFECT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def zimage_pipe():
    return Z.zimage()


def test_list_layers():
    model = Z.zimage_transformer(n_layers=3, n_refiner_layers=2, heads=4)
    layers = headpag.list_layers(model)
    assert [(layer.index, layer.name, layer.fork_unit) for layer in layers] == [
        (i, f"layers.{i}.attention", f"layers.{i}") for i in range(3)]
    assert {(layer.heads, layer.head_dim, layer.kind) for layer in layers} == {(4, 16, "joint")}
    assert forward_units(model) == ["noise_refiner.0", "noise_refiner.1", "context_refiner.0", "context_refiner.1",
                                    "layers.0", "layers.1", "layers.2"]


@pytest.mark.parametrize("cfg", [4.0, 0.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("mode", ["joint", "image"])
def test_zimage(zimage_pipe, cfg, mode):
    """2 prompts x 2 images (list entries repeated per image), both main layers selected."""
    check_fused_eager_restore(zimage_pipe, Z.zimage_inputs(batch=2, num_images_per_prompt=2, cfg=cfg), "0:1,1:*",
                              mode=mode)


def test_cfg_truncation(zimage_pipe):
    """cfg_truncation=0.5: the later steps run without the negative rows (the loop's apply_cfg local); the fused
    calls carry one twin per positive row either way."""
    inputs = Z.zimage_inputs(batch=2, cfg=4.0, steps=4, cfg_truncation=0.5)
    layer1 = {"layer1": zimage_pipe.transformer.layers[1].attention}
    with recorded_rows(layer1) as log:
        M.run(zimage_pipe, inputs)
    plain_rows = log["layer1"]
    assert plain_rows[0] == 4 and plain_rows[-1] == 2  # [positive, negative] rows, then positive rows only
    log, _ = guided_rows(zimage_pipe, layer1, "fused", "1:0", inputs)
    assert log["layer1"] == [rows + 2 for rows in plain_rows]
    check_fused_eager_restore(zimage_pipe, inputs, "1:0")


def test_fork_at_the_last_layer(zimage_pipe):
    """Heads in layers.1 only: the refiners and layers.0 run the base rows, layers.1 the base rows and the twins."""
    den = zimage_pipe.transformer
    modules = {"noise_refiner": den.noise_refiner[0].attention, "context_refiner": den.context_refiner[0].attention,
               "layer0": den.layers[0].attention, "layer1": den.layers[1].attention}
    inputs = Z.zimage_inputs(batch=1, cfg=4.0, steps=1)
    log, out = guided_rows(zimage_pipe, modules, "fused", "1:1", inputs)
    assert log == {"noise_refiner": [2], "context_refiner": [2], "layer0": [2], "layer1": [3]}
    assert effect(out, M.run(zimage_pipe, inputs)) > MIN_EFFECT


def test_interval_reads_the_pipelines_timestep(zimage_pipe):
    """Z-Image passes (1000 - t) / 1000: only the first of three steps lies in [0, 1/3)."""
    layer0 = {"layer0": zimage_pipe.transformer.layers[0].attention}
    log, _ = guided_rows(zimage_pipe, layer0, "fused", "0:0", Z.zimage_inputs(batch=1, cfg=0.0, steps=3),
                         interval=(0.0, 0.3))
    assert log["layer0"] == [2, 1, 1]


def test_img2img():
    pipe = Z.zimage_img2img()
    check_fused_eager_restore(pipe, Z.img2img_inputs(batch=2, cfg=4.0), "0:0,1:1", mode="image")


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("cfg", [4.0, 0.0], ids=["cfg", "no-cfg"])
def test_prompts_of_different_padded_lengths(zimage_pipe, cfg, mode):
    """Prompts of 40 and 7 tokens pad to 64 and 32 (the negatives to 32): Z-Image masks the batch padding of the
    shorter rows. Every head of layer 1 equals the reference fold of a text-last SDPA under the call's mask, the
    text span being everything after the image tokens (64 tokens, the padding of shorter rows masked)."""
    perturbed = module_pass(sdpa_perturbed_copy(zimage_pipe, "layers.1.attention", mode, n_text=64, text="last"))
    check_matches_reference(zimage_pipe, Z.zimage_inputs(batch=2, cfg=cfg, lengths=(40, 7)), "1:*", perturbed,
                            scale=2.0, cfg=cfg > 0, calls="one", cond="first", mode=mode)


def test_cfg_normalization_is_refused(zimage_pipe):
    with pytest.raises(ValueError, match="cfg_normalization"):
        guided(zimage_pipe, "fused", "0:0", Z.zimage_inputs(batch=1, cfg=4.0, cfg_normalization=1.0))
    # without CFG it is never applied
    with patched(zimage_pipe, "fused", "0:0"):
        M.run(zimage_pipe, Z.zimage_inputs(batch=1, cfg=0.0, cfg_normalization=1.0))


# --- against an independent perturbed pass ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("cfg", [4.0, 0.0], ids=["cfg", "no-cfg"])
def test_every_head_of_a_layer_matches_an_independent_perturbed_pass(zimage_pipe, cfg, mode):
    """Every head of layer 1 with u=1 equals the reference fold of a text-last identity SDPA on that layer: checks
    the caption's place and padded length (32 tokens for these prompts), the list rows and the fold into both the
    positive and the negative rows."""
    # Z-Image's [image, caption] order; one call with the list rows [positive..., negative...] under CFG
    perturbed = module_pass(sdpa_perturbed_copy(zimage_pipe, "layers.1.attention", mode, n_text=32, text="last"))
    check_matches_reference(zimage_pipe, Z.zimage_inputs(batch=2, cfg=cfg), "1:*", perturbed, scale=2.0, cfg=cfg > 0,
                            calls="one", cond="first", mode=mode)
