"""enable / configure / disable on tiny pipelines: scale=0 and disable restore exactly, enabling twice never stacks,
the context manager, configure == a fresh enable, processors left alone, and the processors and attention masks
headpag refuses on a selected layer.

"plain" is the unpatched pipeline's output for the same inputs and seed (tests/support/models.py).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0, PAGJointAttnProcessor2_0

import headpag
from support import models as M
from support.checks import (
    ENABLE, MIN_EFFECT, attention_modules, close, effect, guided, n_layers, patched, snapshot, with_plain,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ================================================================================================================
# scale=0, disable, enable twice, the context manager, configure
# ================================================================================================================


@pytest.mark.parametrize("execution", list(ENABLE))
@pytest.mark.parametrize("model", ["sd3", "sd35", "sd15", "sdxl", "dit"])
def test_scale_zero_and_disable_restore_exactly(model, execution):
    pipe, inputs, plain = with_plain(model)
    before = snapshot(pipe)
    assert not any(before["registries"].values())
    n = n_layers(pipe)
    heads = f"0:0,{n - 1}:1"

    try:
        ENABLE[execution](pipe, heads, scale=0.0)
        assert torch.equal(M.run(pipe, inputs), plain)
        ENABLE[execution](pipe, heads, scale=3.0)  # enabling again replaces the settings
        during = snapshot(pipe)
        assert during["processors"] == before["processors"], "headpag must not swap processors"
        assert effect(M.run(pipe, inputs), plain) > MIN_EFFECT
        assert snapshot(pipe)["processors"] == before["processors"]
        headpag.disable(pipe)

        after = snapshot(pipe)
        assert after == before
        assert not hasattr(M.denoiser(pipe), "_diffusers_hook")
        assert torch.equal(M.run(pipe, inputs), plain)
        headpag.disable(pipe)  # no-op when not patched
        assert snapshot(pipe) == before
    finally:
        headpag.disable(pipe)


def test_disable_keeps_a_users_registry():
    """A registry (and hook) the user had on the denoiser stays; only headpag's hooks go."""
    pipe, inputs, plain = with_plain("sd3")
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(ModelHook(), "user")
    before = snapshot(pipe)
    with patched(pipe, "fused", "1:0", scale=3.0):
        assert effect(M.run(pipe, inputs), plain) > MIN_EFFECT
    assert pipe.transformer._diffusers_hook is registry and list(registry.hooks) == ["user"]
    assert snapshot(pipe)["processors"] == before["processors"]
    assert snapshot(pipe)["registries"] == before["registries"]
    assert torch.equal(M.run(pipe, inputs), plain)


def test_enable_twice_never_stacks():
    pipe, inputs, plain = with_plain("sd3")
    before = snapshot(pipe)
    only_second = guided(pipe, "fused", "2:1,2:3", inputs, scale=2.0)

    try:
        headpag.enable_fused(pipe, "1:0", scale=3.0)
        headpag.enable_fused(pipe, "2:1,2:3", scale=2.0)
        close(M.run(pipe, inputs), only_second, "fp32")
        headpag.enable_eager(pipe, "2:1,2:3", scale=0.0)  # switching execution replaces too
        assert torch.equal(M.run(pipe, inputs), plain)
        headpag.enable_fused(pipe, "1:0", scale=3.0)
        headpag.enable_fused(pipe, "1:0", scale=0.0)
        assert torch.equal(M.run(pipe, inputs), plain)
        headpag.disable(pipe)  # one disable removes everything
        assert snapshot(pipe) == before
        assert torch.equal(M.run(pipe, inputs), plain)
    finally:
        headpag.disable(pipe)


def test_context_manager_disables_on_exit_and_on_exception():
    pipe, inputs, plain = with_plain("sd15")
    before = snapshot(pipe)
    expected = guided(pipe, "fused", "1:0,1:1", inputs, scale=3.0)
    with headpag.fused(pipe, "1:0,1:1", scale=3.0) as p:
        assert p is pipe
        assert torch.equal(M.run(pipe, inputs), expected)
    assert snapshot(pipe) == before
    assert torch.equal(M.run(pipe, inputs), plain)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with headpag.fused(pipe, "1:0", scale=3.0):
            M.run(pipe, inputs)
            raise Boom
    assert snapshot(pipe) == before
    assert torch.equal(M.run(pipe, inputs), plain)


@pytest.mark.parametrize("execution", list(ENABLE))
def test_configure_matches_a_fresh_enable(execution):
    pipe, inputs = M.make("sd3", batch=2)
    before = snapshot(pipe)
    fresh = {
        "scale": guided(pipe, execution, "1:0,1:2", inputs, scale=5.0),
        "heads": guided(pipe, execution, "2:1,2:3", inputs, scale=5.0),
        "u": guided(pipe, execution, "2:1,2:3", inputs, scale=5.0, u=0.5),
        "interval": guided(pipe, execution, "2:1,2:3", inputs, scale=5.0, u=0.5, interval=(0.5, 1.0)),
        "mode": guided(pipe, execution, "2:1,2:3", inputs, scale=5.0, u=0.5, interval=(0.5, 1.0), mode="image"),
    }
    try:
        ENABLE[execution](pipe, "1:0,1:2", scale=3.0)
        first = M.run(pipe, inputs)
        headpag.configure(pipe, scale=5.0)
        changed = M.run(pipe, inputs)
        assert effect(changed, first) > MIN_EFFECT
        close(changed, fresh["scale"], "fp32", "configure(scale=)")
        headpag.configure(pipe, heads="2:1,2:3")
        close(M.run(pipe, inputs), fresh["heads"], "fp32", "configure(heads=)")
        attn1 = pipe.transformer.transformer_blocks[1].attn
        assert not getattr(attn1, "_diffusers_hook", None) or not attn1._diffusers_hook.hooks, "old layer still hooked"
        headpag.configure(pipe, u=0.5)
        close(M.run(pipe, inputs), fresh["u"], "fp32", "configure(u=)")
        headpag.configure(pipe, interval=(0.5, 1.0))
        close(M.run(pipe, inputs), fresh["interval"], "fp32", "configure(interval=)")
        headpag.configure(pipe, mode="image")
        close(M.run(pipe, inputs), fresh["mode"], "fp32", "configure(mode=)")
        headpag.disable(pipe)
        assert snapshot(pipe) == before
        with pytest.raises(ValueError, match="not patched"):
            headpag.configure(pipe, scale=1.0)
    finally:
        headpag.disable(pipe)


# ================================================================================================================
# Processors: untouched on unselected layers; non-default processors and attention masks raise
# ================================================================================================================


class CustomProcessor(AttnProcessor2_0):
    """Computes exactly what AttnProcessor2_0 does, but is not a default processor."""


def test_unselected_layers_keep_their_processors():
    pipe = M.sd15()
    unet = pipe.unet
    before = snapshot(pipe)
    selected = headpag.list_layers(pipe)[2].name
    with patched(pipe, "fused", "2:0,2:3", scale=3.0):
        M.run(pipe, M.sd15_inputs())
        assert snapshot(pipe)["processors"] == before["processors"]
        assert snapshot(pipe)["attn_processors"] == before["attn_processors"]
        for name, module in attention_modules(unet).items():
            hooks = getattr(module, "_diffusers_hook", None)
            names = list(hooks.hooks) if hooks is not None else []
            assert bool(names) == (name == selected), (name, names)


def test_non_default_processor_on_a_selected_layer_raises():
    pipe, inputs = M.make("sd15")
    custom = headpag.list_layers(pipe)[2].name
    unet = pipe.unet
    unet.get_submodule(custom).processor = CustomProcessor()
    before = snapshot(pipe)
    for enable in ENABLE.values():
        with pytest.raises(ValueError, match="CustomProcessor"):
            enable(pipe, "2:0", scale=3.0)
        with pytest.raises(ValueError, match="CustomProcessor"):
            enable(pipe, "0:0,2:*", scale=3.0)
        assert snapshot(pipe) == before
    # other layers are fine, and a failed configure leaves the patch as it was
    with patched(pipe, "fused", "0:0,3:1", scale=3.0):
        expected = M.run(pipe, inputs)
        with pytest.raises(ValueError, match="CustomProcessor"):
            headpag.configure(pipe, heads="2:1")
        assert torch.equal(M.run(pipe, inputs), expected)
    assert snapshot(pipe) == before


def test_diffusers_pag_processor_left_on_sd3_raises():
    pipe = M.sd3()
    pipe.transformer.transformer_blocks[1].attn.processor = PAGJointAttnProcessor2_0()
    with pytest.raises(ValueError, match="PAGJointAttnProcessor2_0"):
        headpag.enable_fused(pipe, "1:0")
    with patched(pipe, "fused", "2:0"):  # another layer is fine
        pass
    pipe.transformer.transformer_blocks[1].attn.processor = JointAttnProcessor2_0()
    with patched(pipe, "fused", "1:0"):
        assert headpag.is_enabled(pipe)
    assert not headpag.is_enabled(pipe)


def test_attention_mask_on_a_selected_layer_is_applied():
    """A processor's attention mask (SD1.5's AttnProcessor2_0 turns it into an additive SDPA bias) reaches the
    perturbed attention of a selected layer: an all-zero bias changes nothing, a bias that hides half the keys
    changes the output, fused and eager alike."""
    pipe, inputs = M.make("sd15")
    attn = pipe.unet.get_submodule(headpag.list_layers(pipe)[0].name)

    def masking(hide: bool):
        def add_mask(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            mask = torch.zeros(hs.shape[0], 1, hs.shape[1])
            if hide:
                mask[..., ::2] = -10000.0  # diffusers' additive convention for masked keys
            return args, {**kwargs, "attention_mask": mask}
        return attn.register_forward_pre_hook(add_mask, with_kwargs=True)

    outputs = {}
    for execution in ENABLE:
        with patched(pipe, execution, "0:1", scale=3.0):
            expected = M.run(pipe, inputs)
            for hide in (False, True):
                handle = masking(hide)
                try:
                    outputs[execution, hide] = M.run(pipe, inputs)
                finally:
                    handle.remove()
            assert torch.equal(M.run(pipe, inputs), expected), "the masked calls left state behind"
        close(outputs[execution, False], expected, "fp32")
        assert effect(outputs[execution, True], expected) > MIN_EFFECT
    close(outputs["fused", True], outputs["eager", True], "fp32")
