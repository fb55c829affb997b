"""Call patterns read from a pipeline's loop (headpag.archs.loop_reading.detect_call_pattern).

The oracle: every diffusers pipeline registered in headpag is read from its source and the detected pattern must
equal the registered one (name and cfg_off) where that is a built-in layout, and must be "not detected" where the
family registered a CallPattern subclass (loops the built-in patterns cannot describe). Then pipelines that no one
registered, written here as copies of diffusers' SD3 and Flux loops (not subclasses), are accepted and guide exactly
like the registered pipelines; loops that headpag cannot read, or that contradict a pattern, raise before sampling.
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.utils.torch_utils import randn_tensor

import headpag
from headpag.archs import pipelines as call_patterns
from headpag.archs import registry
from headpag.archs.loop_reading import PATTERN_MARKERS, detect_call_pattern, loop_facts
from headpag.archs.pipelines import CALL_PATTERNS, PATTERN_NAMES, CallPattern
from support import models as M
from support.checks import MIN_EFFECT, close, effect, guided

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- the oracle: registered vs. detected ----------------------------------------------------------------------------

REGISTERED = {name: pattern for name, pattern in call_patterns._PIPELINES.items() if isinstance(name, str)}


# Pipelines diffusers hands out as dummy objects without an optional dependency (Kolors: sentencepiece), imported
# from their modules, which need none.
_BY_MODULE = {
    "KolorsPipeline": "diffusers.pipelines.kolors.pipeline_kolors",
    "KolorsImg2ImgPipeline": "diffusers.pipelines.kolors.pipeline_kolors_img2img",
}


def _diffusers_class(name: str) -> type | None:
    """The diffusers class of that name (None for a name diffusers does not have)."""
    cls = getattr(diffusers, name, None)
    if name in _BY_MODULE and (not isinstance(cls, type) or type(cls).__name__ == "DummyObject"):
        cls = getattr(importlib.import_module(_BY_MODULE[name]), name)
    return cls if isinstance(cls, type) and type(cls).__name__ != "DummyObject" else None


def _architecture_of_class(cls: type):
    """The registered architecture of the denoiser a pipeline class is built with, from the annotation of its
    ``transformer`` / ``unet`` constructor argument (detection reads the sample and side-pass arguments from it)."""
    try:
        parameters = inspect.signature(cls.__init__, eval_str=True).parameters
    except Exception:
        parameters = inspect.signature(cls.__init__).parameters
    for attr in ("transformer", "unet"):
        if attr in parameters:
            annotation = parameters[attr].annotation
            for candidate in typing.get_args(annotation) or (annotation,):
                for base in getattr(candidate, "__mro__", ()):
                    if base in registry._REGISTRY:
                        return registry._REGISTRY[base]
    return None


def _expected(pattern: CallPattern) -> CallPattern | None:
    """A built-in layout (a plain CallPattern) must be detected as registered; a CallPattern subclass (its own
    layout: unnamed separate calls, Z-Image's lists) must not be detected."""
    return pattern if type(pattern) is CallPattern else None


def agreement_table() -> list[tuple[str, str, str, str]]:
    """``(pipeline, registered, detected, verdict)`` for every diffusers pipeline registered in headpag."""
    rows = []
    for name, pattern in sorted(REGISTERED.items()):
        registered = f"{pattern.name} {dict(pattern.cfg_off)}"
        cls = _diffusers_class(name)
        assert cls is not None, f"{name} is registered but diffusers has no such pipeline"
        detection = detect_call_pattern(cls, _architecture_of_class(cls))
        found = detection.pattern
        detected = "not detected" if found is None else f"{found.name} {dict(found.cfg_off)}"
        rows.append((name, registered, detected, "agrees" if found == _expected(pattern) else "DISAGREES"))
    return rows


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_detection_agrees_with_every_registered_diffusers_pipeline(name):
    cls = _diffusers_class(name)
    assert cls is not None, f"{name} is registered but diffusers has no such pipeline"
    pattern = REGISTERED[name]
    architecture = _architecture_of_class(cls)
    assert architecture is not None, f"{name}: no registered denoiser in its constructor's annotations"
    detection = detect_call_pattern(cls, architecture)
    expected = _expected(pattern)
    assert detection.pattern == expected, (name, pattern, detection)
    if expected is not None:
        assert detection.matches == (pattern.name,)


def test_the_agreement_table_covers_every_pattern_and_has_no_disagreement():
    rows = agreement_table()
    assert not [row for row in rows if row[3] == "DISAGREES"]
    detected = {row[2].split()[0] for row in rows if row[3] == "agrees" and row[2] != "not detected"}
    assert detected == set(PATTERN_NAMES)
    assert sum(row[3] == "agrees" for row in rows) >= 50


def _registered_denoiser_pipelines(fragment: str) -> list[type]:
    classes = [_diffusers_class(n) for n in dir(diffusers) if n.endswith("Pipeline") and fragment in n]
    return [c for c in classes if c is not None and _architecture_of_class(c) is not None]


def test_diffusers_pag_pipelines_are_never_detected():
    """diffusers' PAG pipelines lay out their own perturbed rows ([uncond, cond, perturbed]): no built-in pattern
    describes them, and the detector must say so rather than guess."""
    pag = _registered_denoiser_pipelines("PAG")
    assert len(pag) >= 10
    for cls in pag:
        assert detect_call_pattern(cls, _architecture_of_class(cls)).pattern is None, cls.__name__


def test_three_row_pipelines_are_never_detected():
    """InstructPix2Pix's [text, image, uncond] rows (chunk(3)): a contradicting marker, not an uncond_cond loop."""
    for cls in _registered_denoiser_pipelines("InstructPix2Pix"):
        assert detect_call_pattern(cls, _architecture_of_class(cls)).pattern is None, cls.__name__


# --- unregistered copies of diffusers' loops are accepted and guide like the registered pipelines ---------------


class _SD3Loop(DiffusionPipeline):
    """StableDiffusion3Pipeline's loop (given embeddings, latent output), rows [uncond, cond] when
    ``self.do_classifier_free_guidance``; registered nowhere and no subclass of a registered pipeline."""

    def __init__(self, transformer, scheduler, vae):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1

    @torch.no_grad()
    def __call__(self, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, height=16, width=16, num_inference_steps=28, guidance_scale=7.0,
                 generator=None, output_type="latent", joint_attention_kwargs=None):
        self._guidance_scale = guidance_scale
        device = self._execution_device
        batch_size = prompt_embeds.shape[0]
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)
        shape = (batch_size, self.transformer.config.in_channels, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            timestep = t.expand(latent_model_input.shape[0])
            noise_pred = self.transformer(
                hidden_states=latent_model_input,
                timestep=timestep,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled_prompt_embeds,
                joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]
            if self.do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return StableDiffusion3PipelineOutput(images=latents)


class _FluxLoop(DiffusionPipeline):
    """FluxPipeline's loop (given embeddings, latent output): the cond call under ``cache_context("cond")``, with
    true CFG the uncond call under ``cache_context("uncond")``; registered nowhere, no registered base class."""

    def __init__(self, transformer, scheduler, vae):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(self, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, true_cfg_scale=1.0, height=32, width=32, num_inference_steps=28,
                 generator=None, output_type="latent"):
        device = self._execution_device
        batch_size = prompt_embeds.shape[0]
        do_true_cfg = true_cfg_scale > 1 and negative_prompt_embeds is not None
        dtype = self.transformer.dtype
        text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)
        negative_text_ids = text_ids
        channels = self.transformer.config.in_channels // 4
        height = 2 * (int(height) // (self.vae_scale_factor * 2))
        width = 2 * (int(width) // (self.vae_scale_factor * 2))
        latents = randn_tensor((batch_size, channels, height, width), generator=generator, device=device,
                               dtype=prompt_embeds.dtype)
        latents = FluxPipeline._pack_latents(latents, batch_size, channels, height, width)
        latent_image_ids = FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, device,
                                                                  prompt_embeds.dtype)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(latents.shape[1], self.scheduler.config.get("base_image_seq_len", 256),
                             self.scheduler.config.get("max_image_seq_len", 4096),
                             self.scheduler.config.get("base_shift", 0.5), self.scheduler.config.get("max_shift", 1.15))
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                            sigmas=sigmas, mu=mu)
        self.scheduler.set_begin_index(0)
        for t in self.progress_bar(timesteps):
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            with self.transformer.cache_context("cond"):
                noise_pred = self.transformer(
                    hidden_states=latents, timestep=timestep / 1000, guidance=None,
                    pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                    img_ids=latent_image_ids, joint_attention_kwargs={}, return_dict=False,
                )[0]
            if do_true_cfg:
                with self.transformer.cache_context("uncond"):
                    neg_noise_pred = self.transformer(
                        hidden_states=latents, timestep=timestep / 1000, guidance=None,
                        pooled_projections=negative_pooled_prompt_embeds,
                        encoder_hidden_states=negative_prompt_embeds, txt_ids=negative_text_ids,
                        img_ids=latent_image_ids, joint_attention_kwargs={}, return_dict=False,
                    )[0]
                noise_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return FluxPipelineOutput(images=latents)


def _copy(cls, registered):
    pipe = cls(transformer=registered.transformer, scheduler=registered.scheduler, vae=registered.vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no_cfg"])
def test_an_unregistered_sd3_loop_guides_like_the_registered_pipeline(cfg):
    registered = M.sd3()
    pipe = _copy(_SD3Loop, registered)
    assert not any(k in call_patterns._PIPELINES for c in _SD3Loop.__mro__ for k in (c, c.__name__))
    assert headpag.archs.call_pattern_of(pipe) is CALL_PATTERNS["uncond_cond"]
    inputs = M.sd3_inputs(batch=2, cfg=cfg)
    plain = M.run(registered, inputs)
    assert torch.equal(M.run(pipe, inputs), plain)  # the copy is the same loop
    for execution in ("fused", "eager"):
        expected = guided(registered, execution, "1:*,2:0", inputs, scale=3.0)
        assert torch.equal(guided(pipe, execution, "1:*,2:0", inputs, scale=3.0), expected), execution
    assert effect(expected, plain) > MIN_EFFECT
    assert torch.equal(M.run(pipe, inputs), plain)  # disabled again


@pytest.mark.parametrize("true_cfg", [4.0, 1.0], ids=["true_cfg", "no_cfg"])
def test_an_unregistered_flux_loop_guides_like_the_registered_pipeline(true_cfg):
    registered = M.flux()
    pipe = _copy(_FluxLoop, registered)
    assert headpag.archs.call_pattern_of(pipe) is CALL_PATTERNS["separate"]  # true CFG off by default: cfg_off {}
    inputs = M.flux_inputs(true_cfg_scale=true_cfg)
    plain = M.run(registered, inputs)
    assert torch.equal(M.run(pipe, inputs), plain)
    fused = guided(pipe, "fused", "1:*,2:0", inputs, scale=3.0)
    assert torch.equal(fused, guided(registered, "fused", "1:*,2:0", inputs, scale=3.0))
    close(fused, guided(pipe, "eager", "1:*,2:0", inputs, scale=3.0), "families")
    assert effect(fused, plain) > MIN_EFFECT


# --- what the detector reads (source only: these classes are never run) -------------------------------------------


class _Loops(DiffusionPipeline):
    """Base of the source-only loops below (no __call__ of its own)."""


class _LocalCFG(_Loops):
    def __call__(self, latents, guidance_scale=4.5, prompt_embeds=None, timesteps=()):
        do_classifier_free_guidance = guidance_scale > 1.0
        for t in timesteps:
            latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
            noise_pred = self.transformer(latent_model_input.to(torch.float32), encoder_hidden_states=prompt_embeds,
                                          timestep=t).sample
            if do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            latents = self.scheduler.step(noise_pred, t, latents).prev_sample
        return latents


class _CondFirstDiT(_Loops):
    def __call__(self, latents, class_labels, guidance_scale=4.0, timesteps=()):
        latent_model_input = torch.cat([latents] * 2) if guidance_scale > 1 else latents
        class_labels_input = torch.cat([class_labels, torch.full_like(class_labels, 1000)])
        for t in timesteps:
            if guidance_scale > 1:
                half = latent_model_input[: len(latent_model_input) // 2]
                latent_model_input = torch.cat([half, half], dim=0)
            noise_pred = self.transformer(latent_model_input, timestep=t, class_labels=class_labels_input).sample
            if guidance_scale > 1:
                cond_eps, uncond_eps = torch.split(noise_pred, len(noise_pred) // 2, dim=0)
                half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
                noise_pred = torch.cat([half_eps, half_eps], dim=0)
            latent_model_input = self.scheduler.step(noise_pred, t, latent_model_input).prev_sample
        return latent_model_input


class _WanAlias(_Loops):
    """Wan's loop: the denoiser through a local alias, calls named by cache contexts, CFG by the property."""

    def __call__(self, latents, guidance_scale=5.0, timesteps=()):
        for t in timesteps:
            current_model = self.transformer if t >= 500 else self.transformer_2
            with current_model.cache_context("cond"):
                noise_pred = current_model(hidden_states=latents, timestep=t, return_dict=False)[0]
            if self.do_classifier_free_guidance:
                with current_model.cache_context("uncond"):
                    noise_uncond = current_model(hidden_states=latents, timestep=t, return_dict=False)[0]
                noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents


class _CondFirstSplit(_Loops):
    """An uncond_cond loop but for a cond-first split: contradicting markers."""

    def __call__(self, latents, guidance_scale=5.0, timesteps=()):
        for t in timesteps:
            latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            noise_pred = self.transformer(latent_model_input, timestep=t)[0]
            if self.do_classifier_free_guidance:
                noise_pred_text, noise_pred_uncond = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        return latents


class _ThreeWay(_Loops):
    """InstructPix2Pix-like: three row groups."""

    def __call__(self, latents, guidance_scale=5.0, timesteps=()):
        for t in timesteps:
            latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            noise_pred = self.transformer(latent_model_input, timestep=t)[0]
            if self.do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred_text, noise_pred_image, noise_pred_uncond = noise_pred.chunk(3)
        return latents


class _CompoundTest(_Loops):
    """The sample is doubled under a test the pattern does not read (CFG and something else)."""

    def __call__(self, latents, guidance_scale=5.0, timesteps=(), guess_mode=False):
        for t in timesteps:
            doubled = self.do_classifier_free_guidance and not guess_mode
            latent_model_input = torch.cat([latents] * 2) if doubled else latents
            noise_pred = self.transformer(latent_model_input, timestep=t)[0]
            if self.do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        return latents


class _TwoCalls(_Loops):
    """An uncond_cond loop with a second denoiser call (SAG-like): the pattern would misread that call's rows."""

    def __call__(self, latents, guidance_scale=5.0, timesteps=()):
        for t in timesteps:
            latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            noise_pred = self.transformer(latent_model_input, timestep=t)[0]
            if self.do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                degraded = self.transformer(latents, timestep=t)[0]
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - degraded)
        return latents


class _SkipLayerPass(_Loops):
    """SD3's loop with skip-layer guidance: the second call passes skip_layers (a side pass for SD3's architecture)."""

    def __call__(self, latents, guidance_scale=5.0, timesteps=(), skip_guidance_layers=None):
        for t in timesteps:
            latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            noise_pred = self.transformer(hidden_states=latent_model_input, timestep=t)[0]
            if self.do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                skipped = self.transformer(hidden_states=latents, timestep=t, skip_layers=skip_guidance_layers)[0]
                noise_pred = noise_pred + (noise_pred_text - skipped)
        return latents


class _OtherContext(_Loops):
    """Cache contexts other than cond / uncond around the calls: not the separate pattern."""

    def __call__(self, latents, timesteps=()):
        for t in timesteps:
            with self.transformer.cache_context("cond"):
                noise_pred = self.transformer(latents, timestep=t)[0]
            with self.transformer.cache_context("uncond_stg"):
                noise_stg = self.transformer(latents, timestep=t)[0]
            latents = latents + noise_pred - noise_stg
        return latents


class _SingleCall(_Loops):
    """One denoiser call per step and no CFG anywhere (FLUX.1 Fill-like): the separate pattern's cond calls."""

    def __call__(self, latents, guidance_scale=30.0, timesteps=()):
        for t in timesteps:
            noise_pred = self.transformer(hidden_states=latents, timestep=t / 1000, guidance=guidance_scale)[0]
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents


class _SingleCallWithNegatives(_Loops):
    """One call per step, but negative embeddings around: CFG done some unreadable way, not detected."""

    def __call__(self, latents, prompt_embeds, negative_prompt_embeds, timesteps=()):
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        for t in timesteps:
            noise_pred = self.transformer(latents.repeat(2, 1, 1), encoder_hidden_states=embeds, timestep=t)[0]
            latents = latents + noise_pred[1:] - noise_pred[:1]
        return latents


@pytest.mark.parametrize("cls,architecture,expected", [
    (_LocalCFG, "PixArtTransformer2DModel", CALL_PATTERNS["uncond_cond_local"]),
    (_CondFirstDiT, "DiTTransformer2DModel", CALL_PATTERNS["cond_uncond"]),
    (_WanAlias, "WanTransformer3DModel", CallPattern("separate", {"guidance_scale": 1.0})),
    (_SkipLayerPass, "SD3Transformer2DModel", CALL_PATTERNS["uncond_cond"]),
    (_SingleCall, "FluxTransformer2DModel", CALL_PATTERNS["separate"]),
    (_SkipLayerPass, "FluxTransformer2DModel", None),  # Flux has no side-pass argument: two calls
    (_CondFirstSplit, "SD3Transformer2DModel", None),
    (_ThreeWay, "SD3Transformer2DModel", None),
    (_CompoundTest, "SD3Transformer2DModel", None),
    (_TwoCalls, "SD3Transformer2DModel", None),
    (_OtherContext, "FluxTransformer2DModel", None),
    (_SingleCallWithNegatives, "FluxTransformer2DModel", None),
    (_Loops, "SD3Transformer2DModel", None),  # no __call__ at all
], ids=lambda v: getattr(v, "__name__", v) if not isinstance(v, CallPattern) else v.name)
def test_markers_and_contradictions(cls, architecture, expected):
    arch = next(a for a in headpag.archs.registered_architectures() if a.name == architecture)
    detection = detect_call_pattern(cls, arch)
    assert detection.pattern == expected, detection.reason
    if expected is None:
        assert detection.reason


def test_detection_is_cached_per_class():
    arch = headpag.archs.architecture_of(M.sd3_transformer())
    assert detect_call_pattern(_SkipLayerPass, arch) is detect_call_pattern(_SkipLayerPass, arch)
    assert loop_facts(_SkipLayerPass) is loop_facts(_SkipLayerPass)


# --- refusals before sampling ---------------------------------------------------------------------------------------


class _Bare(DiffusionPipeline):
    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)


_namespace: dict = {}
exec("def __call__(self, *args, **kwargs):\n    return self.transformer(*args, **kwargs)\n", _namespace)
#: A pipeline whose __call__ has no source to read (made by exec).
_Unreadable = type("_UnreadablePipeline", (_Bare,), {"__call__": _namespace["__call__"]})


class _UnknownLoop(_Bare):
    """Rows [uncond, cond] built and split by slicing: a loop headpag cannot read."""

    def __call__(self, latents, prompt_embeds, timesteps=()):
        for t in timesteps:
            x = latents.repeat(2, 1, 1, 1)
            pred = self.transformer(x, encoder_hidden_states=prompt_embeds, timestep=t)[0]
            latents = pred[:1] + 5.0 * (pred[1:] - pred[:1])
        return latents


@pytest.mark.parametrize("cls,why", [
    (_Unreadable, r"the source of _UnreadablePipeline.__call__ cannot be read"),
    (_UnknownLoop, r"_UnknownLoop.__call__ matches none \(not uncond_cond: "),
    (_Bare, r"_Bare defines no __call__"),
])
def test_a_loop_headpag_cannot_read_raises_before_sampling_naming_the_patterns(cls, why):
    base = M.sd3()
    pipe = cls(transformer=base.transformer, scheduler=base.scheduler)
    for enable in (headpag.enable_fused, headpag.enable_eager):
        with pytest.raises(TypeError) as error:
            enable(pipe, "1:0")
        message = str(error.value)
        assert message.startswith(f"unsupported pipeline {cls.__name__}: ")
        assert re.search(why, message), message
        assert "headpag.register_pipeline(cls, pattern)" in message
        for name in PATTERN_NAMES:
            assert f"{name!r}: {PATTERN_MARKERS[name]}" in message
        assert not headpag.is_enabled(pipe)


def test_an_unregistered_denoiser_keeps_the_unsupported_model_error():
    class Plain:
        transformer = torch.nn.Linear(2, 2)

        def __call__(self):
            return self.transformer(torch.zeros(1, 2))

    with pytest.raises(TypeError, match=r"unsupported model Plain \(its .transformer is a Linear\)"):
        headpag.enable_fused(Plain(), "0:0")


@pytest.fixture
def restore_pipelines():
    saved = dict(call_patterns._PIPELINES)
    try:
        yield
    finally:
        call_patterns._PIPELINES.clear()
        call_patterns._PIPELINES.update(saved)


@pytest.mark.usefixtures("restore_pipelines")
def test_registrations_keep_priority_over_detection():
    """A registered class (or base class) is never read: a subclass of a registered pipeline with an unreadable
    __call__ gets the registered pattern, and registering a detectable class overrides what its loop says."""
    base = M.sd3()
    unreadable = type("_UnreadableSD3", (StableDiffusion3Pipeline,), {"__call__": _namespace["__call__"]})
    sub = unreadable(**base.components)
    assert headpag.archs.call_pattern_of(sub) is CALL_PATTERNS["uncond_cond"]
    copy = _copy(_SD3Loop, base)
    custom = CallPattern("uncond_cond", {"guidance_scale": 0.5})
    headpag.register_pipeline(_SD3Loop, custom)
    assert headpag.archs.call_pattern_of(copy) is custom
