"""headpag.list_layers on tiny diffusers models built from configs (CPU, no hub)."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from headpag import LayerInfo, list_layers
from headpag.archs import get_denoiser, registered_architectures
from support import models as M


# --- tiny models (tests/support/models.py) and one forward each ----------------------------------------------------


def sd3():
    return M.sd3_transformer(num_layers=2)


def sd35():
    return M.sd3_transformer(num_layers=3, dual_attention_layers=(0, 1), qk_norm="rms_norm")


# UNet layouts: 32/64 channels, 2 heads per layer (legacy attention_head_dim) and 32-dim text.
UNET = dict(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2)


def unet_sd():
    """SD1.5 layout in small: cross-attention in the first down / last up block, layers_per_block=2."""
    return M.unet(**UNET)


def unet_all():
    """Cross-attention everywhere, heads per block (2, 4), two transformer blocks per Transformer2DModel in the
    second level (SDXL-style transformer_layers_per_block)."""
    return M.unet(**UNET | dict(layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                                transformer_layers_per_block=(1, 2)))


def unet_no_mid():
    return M.unet(**UNET, layers_per_block=1, mid_block_type=None)


def pixart():
    return M.pixart_transformer()


def dit():
    return M.dit_transformer(heads=2)


def run_forward(model):
    """One forward with tiny inputs (batch 1)."""
    t = torch.tensor([500.0])
    x = torch.randn(1, 4, 8, 8)
    if isinstance(model, SD3Transformer2DModel):
        model(hidden_states=x, encoder_hidden_states=torch.randn(1, 5, 32), pooled_projections=torch.randn(1, 16),
              timestep=t)
    elif isinstance(model, FluxTransformer2DModel):
        model(hidden_states=torch.randn(1, 4, 16), encoder_hidden_states=torch.randn(1, 3, 32),
              pooled_projections=torch.randn(1, 24), timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3),
              txt_ids=torch.zeros(3, 3))
    elif isinstance(model, UNet2DConditionModel):
        model(x, t, encoder_hidden_states=torch.randn(1, 5, 32))
    elif isinstance(model, PixArtTransformer2DModel):
        model(x, encoder_hidden_states=torch.randn(1, 5, 12), timestep=t,
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    elif isinstance(model, DiTTransformer2DModel):
        model(x, timestep=t, class_labels=torch.tensor([3]))
    else:
        raise AssertionError(type(model))


def _blocks(prefix, n, attn):
    return [(f"{prefix}.{i}.{attn}", f"{prefix}.{i}") for i in range(n)]


def _tb(block, attention, k=0):
    return f"{block}.attentions.{attention}.transformer_blocks.{k}.attn1"


# factory, expected [(name, fork_unit)], expected heads per layer, head_dim per layer, kind
CASES = {
    "sd3": (sd3, _blocks("transformer_blocks", 2, "attn"), [4] * 2, [8] * 2, "joint"),
    "sd35": (sd35, _blocks("transformer_blocks", 3, "attn"), [4] * 3, [8] * 3, "joint"),
    "flux": (M.flux_transformer, _blocks("transformer_blocks", 1, "attn") + _blocks("single_transformer_blocks", 2, "attn"),
             [2] * 3, [16] * 3, "joint"),
    "unet_sd": (unet_sd, [
        (_tb("down_blocks.0", 0), "down_blocks.0"),
        (_tb("down_blocks.0", 1), "down_blocks.0"),
        (_tb("mid_block", 0), "mid_block"),
        (_tb("up_blocks.1", 0), "up_blocks.1"),
        (_tb("up_blocks.1", 1), "up_blocks.1"),
        (_tb("up_blocks.1", 2), "up_blocks.1"),
    ], [2] * 6, [16, 16, 32, 16, 16, 16], "self"),
    "unet_all": (unet_all, [
        (_tb("down_blocks.0", 0), "down_blocks.0"),
        (_tb("down_blocks.1", 0, 0), "down_blocks.1"),
        (_tb("down_blocks.1", 0, 1), "down_blocks.1"),
        (_tb("mid_block", 0, 0), "mid_block"),
        (_tb("mid_block", 0, 1), "mid_block"),
        (_tb("up_blocks.0", 0, 0), "up_blocks.0"),
        (_tb("up_blocks.0", 0, 1), "up_blocks.0"),
        (_tb("up_blocks.0", 1, 0), "up_blocks.0"),
        (_tb("up_blocks.0", 1, 1), "up_blocks.0"),
        (_tb("up_blocks.1", 0), "up_blocks.1"),
        (_tb("up_blocks.1", 1), "up_blocks.1"),
    ], [2, 4, 4, 4, 4, 4, 4, 4, 4, 2, 2], [16] * 11, "self"),
    "unet_no_mid": (unet_no_mid, [
        (_tb("down_blocks.0", 0), "down_blocks.0"),
        (_tb("up_blocks.1", 0), "up_blocks.1"),
        (_tb("up_blocks.1", 1), "up_blocks.1"),
    ], [2] * 3, [16] * 3, "self"),
    "pixart": (pixart, _blocks("transformer_blocks", 2, "attn1"), [2] * 2, [8] * 2, "self"),
    "dit": (dit, _blocks("transformer_blocks", 3, "attn1"), [2] * 3, [8] * 3, "self"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    factory, expected, heads, head_dims, kind = CASES[request.param]
    torch.manual_seed(0)
    return factory(), expected, heads, head_dims, kind


# --- tests -------------------------------------------------------------------------------------------------------


def test_exact_table(case):
    model, expected, heads, head_dims, kind = case
    layers = list_layers(model)
    assert all(isinstance(x, LayerInfo) for x in layers)
    assert [x.index for x in layers] == list(range(len(expected)))
    assert [(x.name, x.fork_unit) for x in layers] == expected
    assert [x.heads for x in layers] == heads
    assert [x.head_dim for x in layers] == head_dims
    assert {x.kind for x in layers} == {kind}


def test_heads_and_fork_units_match_modules(case):
    model, *_ = case
    modules = dict(model.named_modules())
    for x in list_layers(model):
        attn = modules[x.name]
        assert x.heads == attn.heads
        assert x.head_dim == attn.to_q.out_features // attn.heads
        assert x.fork_unit in modules
        assert x.name.startswith(x.fork_unit + ".")
        # the fork unit is a direct element of the denoiser's loop (a block list entry or the mid block)
        assert x.fork_unit == "mid_block" or x.fork_unit.count(".") == 1


def test_forward_order(case):
    """Layer order == the order the forward pass calls the self/joint attention modules (hooks on every
    module named *.attn / *.attn1, found independently of list_layers)."""
    model, *_ = case
    calls = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.append(n))
               for n, m in model.named_modules() if n.endswith((".attn", ".attn1"))]
    try:
        with torch.no_grad():
            run_forward(model)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == len(handles)
    assert calls == [x.name for x in list_layers(model)]


def test_unet_named_modules_order_differs():
    """The reason list_layers builds the UNet order explicitly: registration order is down, up, mid."""
    model = unet_sd()
    registered = [n for n, _ in model.named_modules() if n.endswith("attn1")]
    assert registered != [x.name for x in list_layers(model)]
    assert sorted(registered) == sorted(x.name for x in list_layers(model))


def test_sd35_attn2_is_not_a_layer():
    model = sd35()
    names = [x.name for x in list_layers(model)]
    assert "transformer_blocks.0.attn2" in dict(model.named_modules())
    assert not any("attn2" in n for n in names)


def test_unet_cross_attention_is_never_a_layer():
    for model in (unet_sd(), unet_all()):
        assert not any("attn2" in x.name for x in list_layers(model))


# importing torch.compile's machinery trips torch's own torch.jit.script_method deprecation warnings
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_pipeline_and_wrappers():
    pipe = M.dit(heads=2)
    model = pipe.transformer
    assert get_denoiser(pipe) is model
    assert list_layers(pipe) == list_layers(model)
    unet = unet_no_mid()
    assert get_denoiser(types.SimpleNamespace(unet=unet)) is unet
    assert get_denoiser(torch.compile(model)) is model
    assert get_denoiser(types.SimpleNamespace(transformer=torch.compile(model))) is model


def test_layerinfo_is_frozen():
    x = list_layers(dit())[0]
    with pytest.raises(AttributeError):
        x.heads = 3


@pytest.mark.parametrize("bad", [
    lambda: UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
    lambda: Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=8, norm_num_groups=4),
    lambda: torch.nn.Linear(2, 2),
    lambda: "SD3Transformer2DModel",
    lambda: types.SimpleNamespace(unet=torch.nn.Linear(2, 2)),
    lambda: types.SimpleNamespace(vae=None),
], ids=["UNet2DModel", "Transformer2DModel", "Linear", "str", "pipe-with-bad-unet", "pipe-without-denoiser"])
def test_unsupported_raises(bad):
    obj = bad()
    with pytest.raises(TypeError, match="unsupported model") as err:
        list_layers(obj)
    for arch in registered_architectures():
        assert arch.name in str(err.value)
