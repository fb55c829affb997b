"""``headpag.guiders.HeadPerturbedAttentionGuidance`` on tiny Modular pipelines (no hub).

Oracles: diffusers' own ``PerturbedAttentionGuidance`` (layer-level PAG = every head of those layers, identity over
the whole sequence: ``mode="joint"``) on the families whose attention processors its layer-skip hooks support, and
``headpag.enable_fused`` on the standard pipeline over the same components (its CFG arithmetic is diffusers';
its PAG part is the original formulation ``cond + w * (cond - perturbed)``; its interval ``start <= i / T`` where the
guider's PAG range is ``int(start * T) < i``).
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance, PerturbedAttentionGuidance
from diffusers.modular_pipelines import ComponentSpec, ModularPipeline

import headpag
from headpag.guiders import HeadPerturbedAttentionGuidance
from tests.support import checks
from tests.support import models as M
from tests.support.modular import (
    FAMILIES, cfg_scale, decoded_modular, decoded_standard, modular, modular_call, run_modular,
)
from tests.support.tolerances import MIN_EFFECT, close

STEPS = 3
EVERY_STEP_BUT_THE_FIRST = dict(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0)
# enable_fused's interval for the same steps: i / T >= 1 / T, i.e. every step but the first
SAME_STEPS = (1 / STEPS, 1.0)


def _family(name: str, cfg: float | None = None):
    family = FAMILIES[name]
    pipe = family.build()
    inputs = family.inputs(steps=STEPS) if cfg is None else family.inputs(cfg=cfg, steps=STEPS)
    return pipe, modular(pipe, family.blocks), inputs


def _guider(heads, cfg: float, **kwargs) -> HeadPerturbedAttentionGuidance:
    return HeadPerturbedAttentionGuidance(heads=heads, guidance_scale=cfg, **{**EVERY_STEP_BUT_THE_FIRST, **kwargs})


# --- against diffusers' PerturbedAttentionGuidance -------------------------------------------------------------

# Families whose processors diffusers' layer-skip hooks know (AttentionProcessorRegistry): layer -> its layer index.
DIFFUSERS_PAG = {"qwenimage": [0, 1], "zimage": [1]}  # (Wan's WanAttnProcessor is not registered there)


@pytest.mark.parametrize("execution", ["fused", "eager"])
@pytest.mark.parametrize("name", sorted(DIFFUSERS_PAG))
def test_every_head_of_a_layer_matches_diffusers_pag_guider(name, execution):
    pipe, mp, inputs = _family(name)
    call, cfg = modular_call(inputs), cfg_scale(name, inputs)
    layers = DIFFUSERS_PAG[name]
    peer = run_modular(mp, PerturbedAttentionGuidance(guidance_scale=cfg, perturbed_guidance_scale=2.0,
                                                      perturbed_guidance_layers=layers, **EVERY_STEP_BUT_THE_FIRST),
                       call)
    heads = ",".join(f"{layer}:*" for layer in layers)
    ours = run_modular(mp, _guider(heads, cfg, perturbed_guidance_scale=2.0, execution=execution), call)
    plain = run_modular(mp, ClassifierFreeGuidance(guidance_scale=cfg), call)
    assert checks.effect(peer, plain) > MIN_EFFECT
    close(ours, peer, "peer")


@pytest.mark.parametrize("options", [
    dict(guidance_rescale=0.7),
    dict(use_original_formulation=True),
    dict(perturbed_guidance_start=0.2, perturbed_guidance_stop=0.8),  # 5 steps: int(1) < i < int(4)
    # CFG on steps 0-2 of 5 only. (On a step with PAG but no CFG, diffusers' guider runs its perturbed batch on the
    # negative prompt's inputs, tuple index 1 of prepare_inputs; headpag's twins are the cond rows, as in PAG.)
    dict(start=0.0, stop=0.6, perturbed_guidance_stop=0.6),
], ids=["rescale", "original-formulation", "pag-range", "cfg-range"])
def test_diffusers_pag_guider_options(options):
    family = FAMILIES["zimage"]
    pipe = family.build()
    mp = modular(pipe, family.blocks)
    call = modular_call(family.inputs(steps=5))
    settings = {**EVERY_STEP_BUT_THE_FIRST, **options}
    peer = run_modular(mp, PerturbedAttentionGuidance(guidance_scale=4.0, perturbed_guidance_scale=2.0,
                                                      perturbed_guidance_layers=[1], **settings), call)
    ours = run_modular(mp, HeadPerturbedAttentionGuidance(heads="1:*", guidance_scale=4.0,
                                                          perturbed_guidance_scale=2.0, **settings), call)
    default = run_modular(mp, HeadPerturbedAttentionGuidance(heads="1:*", guidance_scale=4.0,
                                                             perturbed_guidance_scale=2.0,
                                                             **EVERY_STEP_BUT_THE_FIRST), call)
    assert checks.effect(ours, default) > MIN_EFFECT  # the option changed the result
    close(ours, peer, "peer")


# --- against enable_fused on the standard pipeline -------------------------------------------------------------


# Compared with diffusers' PAG guider above instead: Z-Image's Modular loop differs from ZImagePipeline's even under a
# plain CFG guider (decoded images 0.107 apart); Qwen-Image's loops rescale the guided prediction to the cond
# prediction's norm, and the Modular loop is handed the unperturbed cond (the guider contract) where the fold hands
# QwenImagePipeline cond + delta (decoded images 0.009 apart).
ENABLE_FUSED_PEERS = sorted(set(FAMILIES) - {"zimage", "qwenimage"})
# Families whose standard and Modular latent outputs have one layout (the others are compared decoded).
SAME_LATENTS = {"sd3", "sdxl"}


def _modular_output(name: str, mp, guider, inputs: dict) -> torch.Tensor:
    """The Modular pipeline's output with ``guider``, as latents or decoded (:data:`SAME_LATENTS`)."""
    if name in SAME_LATENTS:
        return run_modular(mp, guider, modular_call(inputs))
    return decoded_modular(mp, guider, modular_call(inputs))


def _standard_output(name: str, pipe, inputs: dict) -> torch.Tensor:
    """The standard pipeline's output (patched or not), in the form of :func:`_modular_output`."""
    return M.run(pipe, inputs) if name in SAME_LATENTS else decoded_standard(pipe, inputs)


@pytest.mark.parametrize("name", ENABLE_FUSED_PEERS)
def test_matches_enable_fused_on_the_standard_pipeline(name):
    pipe, mp, inputs = _family(name)
    heads, cfg = FAMILIES[name].heads, cfg_scale(name, inputs)
    plain = _modular_output(name, mp, ClassifierFreeGuidance(guidance_scale=cfg), inputs)
    guided = _modular_output(name, mp, _guider(heads, cfg, perturbed_guidance_scale=2.0), inputs)
    with headpag.fused(pipe, heads, scale=2.0, interval=SAME_STEPS):
        standard = _standard_output(name, pipe, inputs)
    assert checks.effect(guided, plain) > MIN_EFFECT
    close(guided, standard, "fp32")


@pytest.mark.parametrize("name", ["sd3", "flux2-klein"])
def test_cfg_off_original_formulation_matches_enable_fused(name):
    """Without CFG, ``enable_fused``'s ``cond + w * (cond - perturbed)`` is the guider's original formulation
    (diffusers' default formulation starts from the perturbed prediction instead)."""
    pipe, mp, inputs = _family(name, cfg=1.0)
    heads = FAMILIES[name].heads
    original = _guider(heads, 0.0, perturbed_guidance_scale=2.0, use_original_formulation=True)
    diffusers_form = _guider(heads, 1.0, perturbed_guidance_scale=3.0)  # perturbed + 3 (cond - perturbed)
    guided = _modular_output(name, mp, original, inputs)
    again = _modular_output(name, mp, diffusers_form, inputs)
    with headpag.fused(pipe, heads, scale=2.0, interval=SAME_STEPS):
        standard = _standard_output(name, pipe, inputs)
    close(guided, standard, "fp32")
    close(again, standard, "fp32")


def test_soft_image_mode_adaptive_scale_match_enable_fused():
    pipe, mp, inputs = _family("sd3")
    settings = dict(u=0.5, mode="image", adaptive_scale=0.001)
    guided = run_modular(mp, _guider("0:1,2:*", 5.0, perturbed_guidance_scale=2.0, **settings), modular_call(inputs))
    with headpag.fused(pipe, "0:1,2:*", scale=2.0, interval=SAME_STEPS, **settings):
        standard = M.run(pipe, inputs)
    close(guided, standard, "fp32")


@pytest.mark.parametrize("execution", ["fused", "eager"])
def test_refresh_matches_enable_fused(execution):
    """Both reuse ``cond - perturbed`` between refreshes; the guider's first PAG step (1) is enable_fused's."""
    family = FAMILIES["sd3"]
    pipe = family.build()
    mp, inputs = modular(pipe, family.blocks), family.inputs(steps=6)
    guided = run_modular(mp, _guider("1:*", 5.0, perturbed_guidance_scale=2.0, refresh=2, execution=execution,
                                     adaptive_scale=0.001), modular_call(inputs))
    every_step = run_modular(mp, _guider("1:*", 5.0, perturbed_guidance_scale=2.0, adaptive_scale=0.001),
                             modular_call(inputs))
    with headpag.fused(pipe, "1:*", scale=2.0, interval=(1 / 6, 1.0), refresh=2, adaptive_scale=0.001):
        standard = M.run(pipe, inputs)
    assert checks.effect(guided, every_step) > MIN_EFFECT
    close(guided, standard, "fp32")
    again = run_modular(mp, _guider("1:*", 5.0, perturbed_guidance_scale=2.0, refresh=2, execution=execution,
                                    adaptive_scale=0.001), modular_call(inputs))
    assert torch.equal(again, guided) if execution == "fused" else True  # no difference crosses runs


def test_fused_equals_eager_and_leaves_the_denoiser_as_it_was():
    pipe, mp, inputs = _family("sd3")
    before = checks.snapshot(pipe)
    fused = run_modular(mp, _guider("0:1,1:*@0.5", 5.0), modular_call(inputs))
    assert checks.snapshot(pipe) == before
    eager = run_modular(mp, _guider("0:1,1:*@0.5", 5.0, execution="eager"), modular_call(inputs))
    assert checks.snapshot(pipe) == before
    plain = run_modular(mp, ClassifierFreeGuidance(guidance_scale=5.0), modular_call(inputs))
    assert checks.effect(fused, plain) > MIN_EFFECT
    close(fused, eager, "fp32")
    # after headpag's guider, a plain guider and the standard pipeline run exactly as before
    assert torch.equal(run_modular(mp, ClassifierFreeGuidance(guidance_scale=5.0), modular_call(inputs)), plain)


def test_scale_zero_and_disabled_are_the_plain_guiders_bit_for_bit():
    pipe, mp, inputs = _family("sd3")
    call = modular_call(inputs)
    plain = run_modular(mp, ClassifierFreeGuidance(guidance_scale=5.0), call)
    assert torch.equal(run_modular(mp, _guider("1:*", 5.0, perturbed_guidance_scale=0.0), call), plain)
    cond_only = run_modular(mp, ClassifierFreeGuidance(guidance_scale=5.0, enabled=False), call)
    assert torch.equal(run_modular(mp, _guider("1:*", 5.0, enabled=False), call), cond_only)


# --- config: saved, loaded, checked ----------------------------------------------------------------------------


def test_heads_config_takes_every_head_form():
    heads = headpag.HeadSet("2:0,1:*@0.5")
    as_file = heads.to_dict()
    for form in (heads, "1:*@0.5,2:0", as_file, json.dumps(as_file)):
        guider = HeadPerturbedAttentionGuidance(heads=form)
        assert guider.config.heads == "1:*@0.5,2:0", form
        json.dumps(dict(guider.config))  # the saved config is JSON


def _settings(guider) -> dict:
    """The guider's config without diffusers' bookkeeping keys (``_use_default_values``, ...)."""
    return {k: v for k, v in guider.config.items() if not k.startswith("_")}


def test_guider_config_round_trip(tmp_path):
    guider = HeadPerturbedAttentionGuidance(heads="1:*,2:0@0.5", guidance_scale=4.5, perturbed_guidance_scale=1.5,
                                            perturbed_guidance_start=0.1, perturbed_guidance_stop=0.9, u=0.75,
                                            mode="image", adaptive_scale=0.002, guidance_rescale=0.3,
                                            use_original_formulation=True, execution="eager", refresh=3, start=0.1,
                                            stop=0.8)
    guider.save_pretrained(tmp_path)
    loaded = HeadPerturbedAttentionGuidance.from_pretrained(tmp_path)
    assert _settings(loaded) == _settings(guider)
    assert (loaded.heads, loaded.u, loaded.mode, loaded.execution, loaded.refresh) == (
        "1:*,2:0@0.5", 0.75, "image", "eager", 3)
    assert loaded.new(perturbed_guidance_scale=3.0).perturbed_guidance_scale == 3.0


def test_saving_the_modular_pipeline_keeps_the_guider(tmp_path):
    pipe, mp, inputs = _family("sd3")
    guider = _guider("0:1,2:*", 5.0, perturbed_guidance_scale=2.0, u=0.8)
    guider.save_pretrained(tmp_path / "guider")
    mp.update_components(guider=ComponentSpec(name="guider", type_hint=HeadPerturbedAttentionGuidance,
                                              pretrained_model_name_or_path=str(tmp_path / "guider")).load())
    mp.save_pretrained(str(tmp_path / "pipe"), overwrite_modular_index=True)
    index = json.loads((tmp_path / "pipe" / "modular_model_index.json").read_text())
    assert index["guider"][:2] == ["headpag.guiders", "HeadPerturbedAttentionGuidance"]
    loaded = ModularPipeline.from_pretrained(str(tmp_path / "pipe"))
    loaded.load_components(names=["guider"])
    assert type(loaded.guider) is HeadPerturbedAttentionGuidance
    assert _settings(loaded.guider) == _settings(guider)
    close(run_modular(mp, loaded.guider, modular_call(inputs)), run_modular(mp, guider, modular_call(inputs)), "fp32")


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "heads must be given"),
    (dict(heads=""), "heads is empty"),
    (dict(heads="1:0", mode="text"), "mode must be one of"),
    (dict(heads="1:0", execution="lazy"), "execution must be one of"),
    (dict(heads="1:0", perturbed_guidance_scale=-1.0), "perturbed_guidance_scale must be a finite number >= 0"),
    (dict(heads="1:0", perturbed_guidance_start=0.5, perturbed_guidance_stop=0.2), "perturbed_guidance_stop must be"),
    (dict(heads="1:0", u=1.5), "u must be a number in [0, 1]"),
    (dict(heads="1:0", guidance_rescale=2.0), "guidance_rescale must be a number in [0, 1]"),
    (dict(heads="1:0", adaptive_scale=float("nan")), "adaptive_scale must be a finite number >= 0"),
    (dict(heads="{not json"), "heads looks like JSON"),
    (dict(heads="1:0", use_original_formulation="no"), "use_original_formulation must be True or False"),
    (dict(heads="1:0", enabled=1), "enabled must be True or False"),
])
def test_bad_settings_are_refused_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        HeadPerturbedAttentionGuidance(**kwargs)


@pytest.mark.parametrize("refresh, error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_refresh_is_refused(refresh, error):
    with pytest.raises(error, match="refresh must be an integer >= 1"):
        HeadPerturbedAttentionGuidance(heads="1:0", refresh=refresh)


def test_heads_out_of_range_raise_at_the_first_guided_call():
    pipe, mp, inputs = _family("sd3")
    with pytest.raises(ValueError, match=r"layer 9 \(in 9:0\) out of range"):
        run_modular(mp, _guider("9:0", 5.0), modular_call(inputs))
    assert not hasattr(M.denoiser(pipe), "_diffusers_hook") or not M.denoiser(pipe)._diffusers_hook.hooks


def test_guider_and_standard_patch_on_one_denoiser_are_refused():
    pipe, mp, inputs = _family("sd3")
    headpag.enable_fused(pipe, "1:*")
    try:
        with pytest.raises(RuntimeError, match="call headpag.disable on that pipeline"):
            run_modular(mp, _guider("1:*", 5.0), modular_call(inputs))
        # the standard patch, reached through the Modular pipeline's plain guider, refuses too
        with pytest.raises(RuntimeError, match="set headpag.guiders.HeadPerturbedAttentionGuidance"):
            run_modular(mp, ClassifierFreeGuidance(guidance_scale=5.0), modular_call(inputs))
    finally:
        headpag.disable(pipe)


def test_a_cond_batch_without_a_denoiser_call_raises():
    guider = _guider("1:*", 5.0)
    pipe = M.sd3()
    before = checks.snapshot(pipe)
    guider.set_state(step=1, num_inference_steps=STEPS, timestep=torch.tensor(500.0))
    guider.prepare_models(pipe.transformer)
    with pytest.raises(RuntimeError, match="made no call between prepare_models and cleanup_models"):
        guider.cleanup_models(pipe.transformer)
    assert checks.snapshot(pipe) == before


def _cond_batch(guider, transformer, step: int, rows: int) -> torch.Tensor:
    """One step of a CFG-off loop made by hand, as a Modular denoise block makes it: the guider's state, its one
    batch, prepare_models, the denoiser call of ``rows`` rows, cleanup_models; returns the guided prediction."""
    guider.set_state(step=step, num_inference_steps=STEPS + 1, timestep=torch.tensor(900.0 - 100 * step))
    (batch,) = guider.prepare_inputs({"rows": torch.zeros(rows)})
    guider.prepare_models(transformer)
    g = torch.Generator().manual_seed(step)
    batch.noise_pred = transformer(
        hidden_states=torch.randn(rows, 4, 8, 8, generator=g), timestep=torch.full((rows,), 900.0 - 100 * step),
        encoder_hidden_states=torch.randn(rows, 7, 32, generator=g), pooled_projections=torch.randn(rows, 16, generator=g),
        return_dict=False)[0]
    guider.cleanup_models(transformer)
    return guider([batch]).pred


def test_refresh_never_reuses_another_denoisers_difference():
    """Two denoisers behind one guider (a pipeline switching transformers between steps): the second denoiser's
    first PAG step runs its own twins instead of reusing the first denoiser's difference."""
    first, second = M.sd3().transformer, M.sd3(seed=1).transformer
    guider = _guider("1:*", 1.0, refresh=4)
    attention = {"second": second.get_submodule("transformer_blocks.1.attn")}
    with torch.no_grad(), checks.recorded_rows(attention) as rows:
        _cond_batch(guider, first, 1, rows=1)
        _cond_batch(guider, second, 2, rows=1)  # within refresh of step 1, but another denoiser
        _cond_batch(guider, second, 3, rows=1)  # its own difference of step 2: reused
    assert rows["second"] == [2, 1]  # the cond row and its twin at step 2; the cond row alone at step 3


def test_refresh_refuses_a_difference_of_another_batch_shape():
    """A new run that starts at the step after the last run's (so the guider cannot tell it is new) with another
    batch size raises instead of broadcasting the old run's difference."""
    transformer = M.sd3().transformer
    guider = _guider("1:*", 1.0, refresh=4)
    with torch.no_grad():
        _cond_batch(guider, transformer, 1, rows=1)
        with pytest.raises(RuntimeError, match="a new sampling run started right after"):
            _cond_batch(guider, transformer, 2, rows=2)
