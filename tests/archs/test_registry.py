"""The architecture registry and the pipeline call patterns: discovery of the family modules, subclasses,
user registrations through the public API (they change what the guided step does), and bad input."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from diffusers import DiffusionPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline

import headpag
import headpag.archs as archs
from headpag.archs import pipelines as call_patterns
from headpag.archs import registry
from support import models as M
from support.checks import MIN_EFFECT, close, effect, guided

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def restore_registries():
    """Registrations a test makes are taken back afterwards."""
    architectures, pipelines = dict(registry._REGISTRY), dict(call_patterns._PIPELINES)
    try:
        yield
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(architectures)
        call_patterns._PIPELINES.clear()
        call_patterns._PIPELINES.update(pipelines)


def test_every_family_module_registers_its_architecture():
    """Each module of headpag/archs other than the shared ones holds one registered Architecture of its own
    denoiser class, found without being listed anywhere."""
    families = [m.name for m in pkgutil.iter_modules(archs.__path__) if m.name not in archs._SHARED]
    assert {"sd3", "flux", "unet", "pixart", "dit"} <= set(families)
    registered = archs.registered_architectures()
    for name in families:
        module = importlib.import_module(f"headpag.archs.{name}")
        own = [v for v in vars(module).values() if isinstance(v, archs.Architecture)]
        assert len(own) == 1 and any(own[0] is arch for arch in registered), name
        assert own[0].denoiser.__module__.startswith("diffusers"), name


class _SD3Subclass(SD3Transformer2DModel):
    pass


class _SD3PipelineSubclass(StableDiffusion3Pipeline):
    pass


def test_subclasses_of_a_registered_model_and_pipeline_are_supported():
    pipe = M.sd3()
    transformer = _SD3Subclass.from_config(pipe.transformer.config)
    transformer.load_state_dict(pipe.transformer.state_dict())
    sub = _SD3PipelineSubclass(**{**pipe.components, "transformer": transformer})
    sub.set_progress_bar_config(disable=True)
    assert [l.name for l in headpag.list_layers(sub)] == [l.name for l in headpag.list_layers(pipe)]
    inputs = M.sd3_inputs()
    expected = guided(pipe, "fused", "1:*", inputs)
    assert effect(expected, M.run(pipe, inputs)) > MIN_EFFECT
    assert torch.equal(guided(sub, "fused", "1:*", inputs), expected)


class _LoopPipeline(DiffusionPipeline):
    """A pipeline no one registered: SD3's transformer in a plain flow-matching loop, rows [uncond, cond], whose
    loop headpag cannot read (the prediction is split by slicing, not by a named uncond-first chunk)."""

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                 guidance_scale=5.0, num_inference_steps=2, generator=None):
        self.do_classifier_free_guidance = guidance_scale > 1
        config = self.transformer.config
        latents = torch.randn(prompt_embeds.shape[0], config.in_channels, 8, 8, generator=generator)
        text = torch.cat([negative_prompt_embeds, prompt_embeds])
        pooled = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            x = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            rows = slice(None) if self.do_classifier_free_guidance else slice(prompt_embeds.shape[0], None)
            pred = self.transformer(x, encoder_hidden_states=text[rows], pooled_projections=pooled[rows],
                                    timestep=t.expand(x.shape[0]), return_dict=False)[0]
            if self.do_classifier_free_guidance:
                n = pred.shape[0] // 2
                pred = pred[:n] + guidance_scale * (pred[n:] - pred[:n])
            latents = self.scheduler.step(pred, t, latents).prev_sample
        return latents


def _loop_pipeline():
    base = M.sd3()
    pipe = _LoopPipeline(base.transformer, base.scheduler)
    inputs = {k: v for k, v in M.sd3_inputs(batch=2).items() if k.endswith("embeds")}
    return pipe, inputs


def _loop_run(pipe, inputs, **kwargs):
    return pipe(**inputs, generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.usefixtures("restore_registries")
def test_register_pipeline_makes_an_unknown_pipeline_work():
    pipe, inputs = _loop_pipeline()
    with pytest.raises(TypeError, match=r"unsupported pipeline _LoopPipeline.*register_pipeline.*uncond_cond"):
        headpag.enable_fused(pipe, "1:*")
    assert not headpag.is_enabled(pipe)
    headpag.register_pipeline(_LoopPipeline, "uncond_cond")
    plain = _loop_run(pipe, inputs)
    outputs = {}
    for execution in ("fused", "eager"):
        getattr(headpag, f"enable_{execution}")(pipe, "1:*,2:0", scale=3.0)
        try:
            outputs[execution] = _loop_run(pipe, inputs)
        finally:
            headpag.disable(pipe)
    close(outputs["fused"], outputs["eager"], "fp32")
    assert effect(outputs["fused"], plain) > MIN_EFFECT
    assert torch.equal(_loop_run(pipe, inputs), plain)


class _OddBlocksSD3(SD3Transformer2DModel):
    pass


def _odd_blocks(model):
    for i in range(1, len(model.transformer_blocks), 2):
        yield f"transformer_blocks.{i}.attn", f"transformer_blocks.{i}"


@pytest.mark.usefixtures("restore_registries")
def test_register_architecture_changes_the_layers_the_guided_step_uses():
    """A user architecture whose layers are SD3's odd blocks only: its layer 0 is block 1, so guiding its layer 0
    equals guiding layer 1 of the plain SD3 model; the base class keeps its own table."""
    from dataclasses import replace

    pipe = M.sd3(num_layers=4)
    odd = _OddBlocksSD3.from_config(pipe.transformer.config)
    odd.load_state_dict(pipe.transformer.state_dict())
    odd_pipe = StableDiffusion3Pipeline(**{**pipe.components, "transformer": odd})
    odd_pipe.set_progress_bar_config(disable=True)
    headpag.register_architecture(replace(archs.architecture_of(pipe), denoiser=_OddBlocksSD3, layers=_odd_blocks))
    assert [l.name for l in headpag.list_layers(odd_pipe)] == ["transformer_blocks.1.attn", "transformer_blocks.3.attn"]
    assert len(headpag.list_layers(pipe)) == 4
    inputs = M.sd3_inputs()
    assert torch.equal(guided(odd_pipe, "fused", "0:*", inputs), guided(pipe, "fused", "1:*", inputs))
    with pytest.raises(ValueError, match="layer"):
        headpag.enable_fused(odd_pipe, "2:0")


@pytest.mark.usefixtures("restore_registries")
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kind="cross"), ValueError, r"Architecture.kind must be one of \('joint', 'self'\), got 'cross'"),
    (dict(denoiser=int), TypeError, r"Architecture.denoiser must be an nn.Module subclass"),
    (dict(layers=None), TypeError, r"Architecture.layers must be a callable"),
    (dict(row_args="hidden_states"), TypeError, r"Architecture.row_args must be a non-empty tuple of names"),
    (dict(row_args=("hidden_states", "hiden_states")), ValueError,
     r"Architecture.row_args\[1\] must name an argument of SD3Transformer2DModel.forward \(hidden_states, .*\), "
     r"got 'hiden_states'"),
    (dict(sample_arg="x"), ValueError, r"Architecture.sample_arg must name an argument"),
    (dict(text_arg=None), ValueError, r"Architecture.text_arg must name the text-token argument of a 'joint'"),
    (dict(side_pass_arg=3), ValueError, r"Architecture.side_pass_arg must name an argument"),
    (dict(unit_row_args=None), TypeError, r"Architecture.unit_row_args must map unit class names"),
    (dict(unit_row_args={"JointTransformerBlock": "temb"}), TypeError,
     r"Architecture.unit_row_args\['JointTransformerBlock'\] must be a non-empty tuple"),
    (dict(processors=()), TypeError, r"Architecture.processors must be a non-empty tuple"),
    (dict(text_first="yes"), TypeError, r"Architecture.text_first must be a bool"),
    (dict(scheduler_timestep=1000), TypeError, r"Architecture.scheduler_timestep must be a callable or None"),
])
def test_architecture_refuses_bad_fields(kwargs, error, match):
    """Checked on construction (directly or through dataclasses.replace), so nothing bad is ever registered."""
    from dataclasses import replace

    sd3 = archs.architecture_of(M.sd3_transformer())
    with pytest.raises(error, match=match):
        headpag.register_architecture(replace(sd3, **kwargs))
    assert archs.architecture_of(M.sd3_transformer()) is sd3
    with pytest.raises(TypeError, match="must be a headpag.Architecture"):
        headpag.register_architecture("SD3Transformer2DModel")


def test_call_pattern_refuses_an_unknown_name_unless_a_subclass_reads_the_rows():
    with pytest.raises(ValueError, match=r"CallPattern.name must be one of \('uncond_cond', .*got 'interleaved'"):
        headpag.CallPattern("interleaved", {})

    class Interleaved(headpag.CallPattern):
        def layout(self, pipe, denoiser, arguments, batch, context):
            return None

    assert Interleaved("interleaved", {}).layout(None, None, {}, 2, None) is None


def test_register_pipeline_refuses_bad_input():
    with pytest.raises(ValueError, match=r"pattern must be one of \['uncond_cond', 'uncond_cond_local', "
                                         r"'cond_uncond', 'separate'\] or a CallPattern, got 'interleaved'"):
        headpag.register_pipeline(_LoopPipeline, "interleaved")
    with pytest.raises(TypeError, match="pipeline must be a pipeline class or a class name, got int"):
        headpag.register_pipeline(42, "uncond_cond")
    with pytest.raises(TypeError, match="pattern must be a pattern name or a CallPattern, got int"):
        headpag.register_pipeline(_LoopPipeline, 3)
    assert _LoopPipeline not in call_patterns._PIPELINES


def test_a_unit_class_the_architecture_does_not_know_is_named():
    arch = archs.architecture_of(M.sd3_transformer())
    with pytest.raises(TypeError, match=r"forward-loop unit transformer_blocks.0 is a Linear.*unit_row_args"):
        arch.unit_args(torch.nn.Linear(2, 2), "transformer_blocks.0")
