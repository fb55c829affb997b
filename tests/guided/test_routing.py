"""Attention routing: a selected layer's attention is taken over at diffusers' ``dispatch_attention_fn`` (every
attention backend) and at ``F.scaled_dot_product_attention``; a selected layer whose attention went neither way
raises, naming the layer (never a silent no-op)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import headpag
import headpag.guided.hooks
from headpag.guided.routing import LayerRoute, RowCoefficients, routed
from headpag.kernels import perturbed_attention_from_plan, reference_attention
from support import models as M
from support.checks import MIN_EFFECT, close, effect, guided, patched

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The backends of diffusers' registry that run on a CPU without extra packages.
CPU_BACKENDS = ("native", "_native_math", "_native_flash", "flex")


@pytest.fixture(scope="module")
def flux_pipe():
    """A tiny Flux pipeline; diffusers' global active backend (which set_attention_backend also sets, and
    reset_attention_backend does not restore) is put back afterwards, so later tests run on the default."""
    pipe = M.flux()
    active = _AttentionBackendRegistry._active_backend
    try:
        yield pipe
    finally:
        headpag.disable(pipe)
        pipe.transformer.reset_attention_backend()
        _AttentionBackendRegistry._active_backend = active


@pytest.mark.parametrize("true_cfg", [4.0, 1.0], ids=["true_cfg", "no_cfg"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_cpu_backend_is_routed(flux_pipe, backend, true_cfg):
    """Flux's processor reaches attention through dispatch_attention_fn: with each backend, guidance changes the
    output (a silent no-op would leave it as it was) and fused == eager."""
    flux_pipe.transformer.set_attention_backend(backend)
    try:
        inputs = M.flux_inputs(true_cfg_scale=true_cfg)
        plain = M.run(flux_pipe, inputs)
        fused = guided(flux_pipe, "fused", "1:*,2:0", inputs, scale=3.0)
        eager = guided(flux_pipe, "eager", "1:*,2:0", inputs, scale=3.0)
    finally:
        flux_pipe.transformer.reset_attention_backend()
    assert effect(fused, plain) > MIN_EFFECT, f"guidance was off with backend {backend}"
    close(fused, eager, "families", f"backend {backend}")


def test_dispatched_attention_reaches_the_kernel_in_its_own_layout(flux_pipe, monkeypatch):
    """Flux's (B, N, H, D) tensors go to the kernel as layout "bnhd": the very tensors, no transpose or copy."""
    seen = []

    def watched(q, k, v, u, **kwargs):
        seen.append((kwargs["layout"], tuple(q.shape)))
        return perturbed_attention_from_plan(q, k, v, u, **kwargs)

    monkeypatch.setattr(headpag.guided.hooks, "perturbed_attention_from_plan", watched)
    guided(flux_pipe, "fused", "0:1", M.flux_inputs(true_cfg_scale=1.0, steps=1), scale=3.0)
    heads = headpag.list_layers(flux_pipe)[0].heads
    assert seen and all(layout == "bnhd" and shape[2] == heads for layout, shape in seen)


def test_every_registered_backend_is_wrapped_while_a_session_exists(flux_pipe):
    originals = dict(_AttentionBackendRegistry._backends)
    with patched(flux_pipe, "fused", "0:0"):
        wrapped = _AttentionBackendRegistry._backends
        assert set(wrapped) == set(originals)
        assert all(wrapped[name].__wrapped__ is fn for name, fn in originals.items())
    assert _AttentionBackendRegistry._backends == originals


@pytest.mark.parametrize("backend", sorted(b.value for b in _AttentionBackendRegistry._backends))
def test_a_call_through_any_registered_backend_is_routed(flux_pipe, backend):
    """Inside a routed layer, dispatch_attention_fn with any registered backend, installable here or not (flash,
    sage, xformers, ...), computes headpag's attention instead; outside it the backend's own function runs."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))  # (B, N, H, D)
    u = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0]])
    codes = [[0, 2, 1], [2, 0, 0]]
    route = LayerRoute(reference_attention, RowCoefficients(u, codes, "joint", 0, False), "test.attn")
    expected = reference_attention(q, k, v, u, layout="bnhd")
    with patched(flux_pipe, "fused", "0:0"):
        with routed(route, AttnProcessor2_0()):
            out = dispatch_attention_fn(q, k, v, backend=backend)
        assert route.calls == 1
        torch.testing.assert_close(out, expected.to(out.dtype))
        if backend in CPU_BACKENDS:  # outside a routed layer: the backend's own attention
            plain = dispatch_attention_fn(q, k, v, backend=backend)
            torch.testing.assert_close(plain, reference_attention(q, k, v, 0.0, layout="bnhd").float(),
                                       atol=1e-5, rtol=1e-5)


def _attend_through(entry: str, q, k, v, attn_mask):
    """Attention of ``(B, N, H, D)`` tensors through diffusers' dispatch (native backend) or SDPA ``(B, H, N, D)``."""
    if entry == "dispatch":
        return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, backend="native")
    mask = attn_mask[:, None, None] if attn_mask.dim() == 2 else attn_mask
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("entry", ["dispatch", "sdpa"])
def test_the_call_mask_reaches_headpag_attention(flux_pipe, entry):
    """A mask given to either entry point is applied by headpag's attention as SDPA applies it; a mask whose batch
    is not the routed call's rows (an input not widened with the twins) raises instead of broadcasting wrongly."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))  # (B, N, H, D)
    u = torch.tensor([[0.0, 1.0, 0.5], [0.25, 0.0, 0.0]])
    codes = [[0, 2, 1], [1, 0, 0]]
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, False]])
    expected = reference_attention(q, k, v, u, layout="bnhd", attn_mask=mask)
    assert (expected - reference_attention(q, k, v, u, layout="bnhd")).abs().max() > 1e-2

    def route():
        return LayerRoute(reference_attention, RowCoefficients(u, codes, "joint", 0, False), "test.attn")

    with patched(flux_pipe, "fused", "0:0"):
        for attn_mask in (mask, mask[:, None, None, :]):
            with routed(route(), AttnProcessor2_0()):
                out = _attend_through(entry, q, k, v, attn_mask)
            torch.testing.assert_close(out, expected)
        with pytest.raises(RuntimeError, match="the attention mask has 3 rows for an attention batch of 2"):
            with routed(route(), AttnProcessor2_0()):
                _attend_through(entry, q, k, v, torch.ones(3, 1, 1, 5, dtype=torch.bool))


def test_sdpa_processors_are_routed_too():
    """SD3's processor calls F.scaled_dot_product_attention itself ((B, H, N, D), layout "bhnd")."""
    pipe, inputs = M.sd3(), M.sd3_inputs()
    plain = M.run(pipe, inputs)
    fused = guided(pipe, "fused", "1:0", inputs, scale=3.0)
    close(fused, guided(pipe, "eager", "1:0", inputs, scale=3.0), "fp32")
    assert effect(fused, plain) > MIN_EFFECT


class _ManualAttention(AttnProcessor2_0):
    """A processor that computes attention by hand: neither entry point sees it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))
        maps = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        out = (maps @ v).transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("processor", [AttnProcessor, _ManualAttention], ids=["AttnProcessor", "manual"])
@pytest.mark.parametrize("execution", ["fused", "eager"])
def test_a_processor_that_bypasses_both_entry_points_raises(processor, execution):
    """Set after enabling (set before, AttnProcessor is refused at enable): the guided call raises naming the
    layer and the processor instead of sampling unguided."""
    pipe, inputs = M.sd15(), M.sd15_inputs()
    layer = headpag.list_layers(pipe)[0]
    with patched(pipe, execution, f"{layer.index}:0", scale=3.0):
        pipe.unet.get_submodule(layer.name).set_processor(processor())
        with pytest.raises(RuntimeError, match=rf"selected layer {layer.name} ran no attention through headpag: its "
                                                rf"processor {processor.__name__} called neither"):
            M.run(pipe, inputs)


def test_the_classic_processor_is_refused_before_sampling():
    pipe = M.sd15()
    pipe.unet.set_attn_processor(AttnProcessor())
    with pytest.raises(ValueError, match=r"has processor AttnProcessor.*set AttnProcessor2_0"):
        headpag.enable_fused(pipe, "0:0")
    assert not headpag.is_enabled(pipe)
