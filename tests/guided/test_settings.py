"""The settings of a guided pipeline: the PAG interval widens only the guided steps; bad settings, unsupported
pipelines and an unhonourable ``guidance_rescale`` are rejected (bad settings before any sampling)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3PAGPipeline

import headpag
from support import models as M
from support.checks import ENABLE, MIN_EFFECT, close, effect, patched, recorded_rows, snapshot, with_plain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ================================================================================================================
# The PAG interval
# ================================================================================================================


@pytest.mark.parametrize("interval,guided_steps", [((0.0, 0.0), []), ((0.0, 0.5), [0, 1]), ((0.5, 1.0), [2, 3])])
def test_interval_widens_only_guided_steps(interval, guided_steps):
    pipe, inputs, plain = with_plain("sd3", steps=4)  # batch 1 with CFG: 2 base rows, 1 twin
    last = pipe.transformer.transformer_blocks[-1]
    outs = {}
    for execution in ENABLE:
        with patched(pipe, execution, "1:0,1:2", scale=3.0, interval=interval), recorded_rows({"last": last}) as log:
            outs[execution] = M.run(pipe, inputs)
        if execution == "fused":  # one call per step, widened to 3 rows on guided steps
            assert log["last"] == [3 if i in guided_steps else 2 for i in range(4)]
        else:  # the plain call, plus a separate 1-row perturbed call on guided steps
            assert log["last"] == [n for i in range(4) for n in ([2, 1] if i in guided_steps else [2])]
    if not guided_steps:
        assert torch.equal(outs["fused"], plain) and torch.equal(outs["eager"], plain)
    else:
        assert effect(outs["eager"], plain) > MIN_EFFECT
        close(outs["fused"], outs["eager"], "fp32", f"interval={interval}")


# ================================================================================================================
# Bad input is rejected before any sampling
# ================================================================================================================


class OtherPipeline(DiffusionPipeline):
    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)


BAD_SETTINGS = {
    "heads_layer_out_of_range": (dict(heads="3:0"), ValueError, "out of range"),
    "heads_head_out_of_range": (dict(heads="1:4"), ValueError, "out of range"),
    "heads_empty_string": (dict(heads=""), ValueError, "empty"),
    "heads_empty_list": (dict(heads=[]), ValueError, "empty"),
    "scale_nan": (dict(scale=float("nan")), ValueError, "scale"),
    "scale_negative": (dict(scale=-1.0), ValueError, "scale"),
    "scale_inf": (dict(scale=float("inf")), ValueError, "scale"),
    "scale_bool": (dict(scale=True), TypeError, "scale"),
    "u_negative": (dict(u=-0.1), ValueError, "u"),
    "u_above_one": (dict(u=1.5), ValueError, "u"),
    "u_nan": (dict(u=float("nan")), ValueError, "u"),
    "interval_reversed": (dict(interval=(0.6, 0.4)), ValueError, "interval"),
    "interval_below_zero": (dict(interval=(-0.1, 0.5)), ValueError, "interval"),
    "interval_above_one": (dict(interval=(0.5, 1.5)), ValueError, "interval"),
    "interval_nan": (dict(interval=(0.0, float("nan"))), ValueError, "interval"),
    "interval_not_a_pair": (dict(interval=0.5), ValueError, "interval"),
    "mode_unknown": (dict(mode="images"), ValueError, "mode"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_raise_before_sampling(case):
    kwargs, error, match = BAD_SETTINGS[case]
    pipe = M.sd3()
    before = snapshot(pipe)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    settings = {"heads": "1:0"} | kwargs
    heads = settings.pop("heads")
    for enable in ENABLE.values():
        with pytest.raises(error, match=match):
            enable(pipe, heads, **settings)
        with pytest.raises(error, match=match):
            with headpag.fused(pipe, heads, **settings):
                pytest.fail("the context manager entered")
        assert snapshot(pipe) == before
    assert not calls
    # configure on a patched pipeline: raises and keeps the settings
    inputs = M.sd3_inputs()
    with patched(pipe, "fused", "1:0", scale=3.0):
        expected = M.run(pipe, inputs)
        n_calls = len(calls)
        with pytest.raises(error, match=match):
            headpag.configure(pipe, **kwargs)
        assert len(calls) == n_calls
        assert torch.equal(M.run(pipe, inputs), expected)
    assert snapshot(pipe)["processors"] == before["processors"]


def test_unsupported_pipelines_raise():
    pipe = M.sd3()
    pag = M.peer(pipe, StableDiffusion3PAGPipeline, pag_applied_layers=[r"blocks\.1\.attn$"])
    other = OtherPipeline(transformer=pipe.transformer, scheduler=pipe.scheduler)
    before = snapshot(pipe)
    for bad in (pag, other):
        for enable in ENABLE.values():
            with pytest.raises(TypeError, match="unsupported pipeline"):
                enable(bad, "1:0")
        with pytest.raises(TypeError, match="unsupported pipeline"):
            with headpag.fused(bad, "1:0"):
                pytest.fail("the context manager entered")
    assert snapshot(pipe) == before
    with pytest.raises(TypeError):
        headpag.enable_fused(torch.nn.Linear(2, 2), "0:0")


def test_guidance_rescale_without_a_rescale_to_redirect_raises_at_call_time():
    """A pipeline whose loop modules have no rescale_noise_cfg cannot have guidance_rescale applied against the
    unperturbed cond prediction: a guided CFG call with guidance_rescale > 0 raises (SD3's pipeline, given the
    attribute by hand); 0 runs."""
    pipe, inputs = M.make("sd3")
    for execution in ENABLE:
        with patched(pipe, execution, "0:0", scale=3.0):
            pipe.guidance_rescale = 0.7
            try:
                with pytest.raises(ValueError, match="guidance_rescale > 0 is not supported with headpag on "
                                                     "StableDiffusion3Pipeline: its loop has no rescale_noise_cfg"):
                    M.run(pipe, inputs)
            finally:
                del pipe.guidance_rescale
            M.run(pipe, inputs)


# ================================================================================================================
# One head set per row (the public API HeadHunter and the benchmarks use)
# ================================================================================================================


def test_set_row_heads_guides_each_row_with_its_own_set():
    """Rows of one batch with different head sets equal the same rows guided one set at a time, each twin forking
    at its own layer; None goes back to the configured set."""
    pipe, inputs, plain = with_plain("sd3", batch=2)
    alone = {}
    for heads in ("2:0", "0:*"):
        with patched(pipe, "fused", heads, scale=3.0):
            alone[heads] = M.run(pipe, inputs)
    assert effect(alone["2:0"], alone["0:*"]) > MIN_EFFECT
    with patched(pipe, "fused", "1:1", scale=3.0):
        headpag.set_row_heads(pipe, ["2:0", "0:*"])
        mixed = M.run(pipe, inputs)
        headpag.set_row_heads(pipe, None)
        configured = M.run(pipe, inputs)
        with patched(pipe, "fused", "1:1", scale=3.0):
            assert torch.equal(M.run(pipe, inputs), configured)
    close(mixed[0], alone["2:0"][0], "fp32")
    close(mixed[1], alone["0:*"][1], "fp32")
    assert effect(configured, plain) > MIN_EFFECT


def test_set_row_heads_and_enable_refuse_bad_input():
    pipe = M.sd3()
    with pytest.raises(ValueError, match="pipe is not patched"):
        headpag.set_row_heads(pipe, ["1:0"])
    with pytest.raises(ValueError, match=r"execution must be one of \('fused', 'eager'\), got 'lazy'"):
        headpag.enable(pipe, "1:0", execution="lazy")
    assert not headpag.is_enabled(pipe)
    with patched(pipe, "fused", "1:0"):
        assert headpag.is_enabled(pipe)
        with pytest.raises(ValueError, match="head_sets must hold at least one head set"):
            headpag.set_row_heads(pipe, [])
        with pytest.raises(ValueError, match=r"head_sets\[1\] is empty"):
            headpag.set_row_heads(pipe, ["1:0", ""])
        with pytest.raises(ValueError, match=r"layer 9.*3 layers"):
            headpag.set_row_heads(pipe, ["9:0"])
        for bad in ("1:0,2:0", headpag.HeadSet("1:0"), 3):
            with pytest.raises(TypeError, match=rf"head_sets must be a sequence of head sets.*got {type(bad).__name__}"):
                headpag.set_row_heads(pipe, bad)


def test_a_refused_set_row_heads_keeps_the_earlier_row_heads():
    pipe, inputs, _ = with_plain("sd3", batch=2)
    with patched(pipe, "fused", "1:1", scale=3.0):
        headpag.set_row_heads(pipe, ["2:0", "0:*"])
        before = M.run(pipe, inputs)
        with pytest.raises(ValueError):
            headpag.set_row_heads(pipe, ["2:0", ""])
        assert torch.equal(M.run(pipe, inputs), before)
