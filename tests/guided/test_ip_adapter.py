"""IP-Adapter on selected layers: SD3 (``SD3IPAdapterJointAttnProcessor2_0``), Flux (``FluxIPAdapterAttnProcessor``),
SD1.5 / SDXL UNets (``IPAdapterAttnProcessor2_0`` on the cross-attention beside headpag's self-attention layers).

The adapters are tiny random ones loaded offline with the pipelines' own ``load_ip_adapter`` from a state dict
(support/models_ip_adapter.py). The layer's own attention goes through headpag, the adapter's branch stays diffusers'.
Oracles: the eager implementation; a copy of the denoiser in which the selected heads of every SDPA call whose keys
are the queries' own tokens return their values, told apart from the adapter's calls by shape rather than by order
(support/reference_ip.py); diffusers' ``StableDiffusionPAGPipeline`` / ``StableDiffusionXLPAGPipeline`` with
``ip_adapter_image_embeds`` for whole UNet layers.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

import headpag
from headpag.guided import routing
from support import models as M
from support import models_ip_adapter as IP
from support.checks import MIN_EFFECT, check_matches_peer, effect, guided
from support.tolerances import close
from support.reference import check_matches_reference, module_pass
from support.reference_ip import own_identity_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# family -> (pipeline with the adapter, its inputs, the same pipeline without it, selected heads)
FAMILIES = {
    # joint layers 0 and 2, both with the SD3 IP-Adapter processor
    "sd3": (IP.sd3_ip, IP.sd3_ip_inputs, M.sd3, {0: [0, 2], 2: [1]}),
    # layer 0: the double block (IP-Adapter processor); layer 1: a single block (default processor)
    "flux": (IP.flux_ip, IP.flux_ip_inputs, M.flux, {0: [1], 1: [0]}),
    # self-attention layers beside IP-Adapter cross-attention: first (down block) and last (up block)
    "sd15": (IP.sd15_ip, IP.sd15_ip_inputs, M.sd15, {0: [0, 1], 5: [2]}),
    "sdxl": (IP.sdxl_ip, IP.sdxl_ip_inputs, M.sdxl, {0: [0, 1], 3: [2, 3]}),
}
IP_PROCESSORS = {"sd3": "SD3IPAdapterJointAttnProcessor2_0", "flux": "FluxIPAdapterAttnProcessor",
                 "sd15": "IPAdapterAttnProcessor2_0", "sdxl": "IPAdapterAttnProcessor2_0"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    make, inputs, plain, heads = FAMILIES[request.param]
    return request.param, make(), inputs, plain, heads


def _selected(pipe, heads: dict) -> list[str]:
    layers = headpag.list_layers(pipe)
    return [layers[i].name for i in heads]


def test_adapter_is_on_the_model(family):
    """The tests below exercise the adapter: its processor is on the SD3 / Flux layers selected (not on Flux's single
    block), and on the UNets' cross-attention beside the selected self-attention layers."""
    name, pipe, _, _, heads = family
    den = M.denoiser(pipe)
    processors = {n: type(den.get_submodule(n).processor).__name__ for n in _selected(pipe, heads)}
    if name == "sd3":
        assert set(processors.values()) == {IP_PROCESSORS[name]}
    elif name == "flux":
        assert list(processors.values()) == [IP_PROCESSORS[name], "FluxAttnProcessor"]
    else:
        assert set(processors.values()) == {"AttnProcessor2_0"}
        cross = [n.removesuffix(".attn1") + ".attn2" for n in processors]
        assert {type(den.get_submodule(n).processor).__name__ for n in cross} == {IP_PROCESSORS[name]}


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
def test_fused_eager_restore(family, cfg):
    """Fused == eager (float32, relative to the output's scale: the SDXL latents reach ~400), guidance changes the
    output, disable restores the plain pipeline bit for bit, scale 0 is the plain pipeline."""
    name, pipe, inputs, _, heads = family
    kw = inputs(**({"true_cfg_scale": 4.0 if cfg else 1.0} if name == "flux" else {"cfg": 5.0 if cfg else 1.0}))
    plain = M.run(pipe, kw)
    fused, eager = (guided(pipe, execution, heads, kw, scale=3.0) for execution in ("fused", "eager"))
    close(fused, eager, "fp32", name)
    assert effect(fused, plain) > MIN_EFFECT, "guidance changed nothing"
    assert torch.equal(M.run(pipe, kw), plain), "disable did not restore the pipeline"
    assert torch.equal(guided(pipe, "fused", heads, kw, scale=0.0), plain), "scale=0 is not the plain pipeline"


def test_adapter_reaches_the_guided_output(family):
    """The guided output with the adapter differs from the guided output of the same weights without it (so the
    adapter's branch ran in the guided step, on every row)."""
    name, pipe, inputs, plain, heads = family
    kw = inputs()
    without = plain()  # same seed: the same base weights, no adapter
    for execution in ("fused", "eager"):
        with_ip = guided(pipe, execution, heads, kw, scale=3.0)
        without_ip = guided(without, execution, heads, IP.without_ip(kw), scale=3.0)
        assert effect(with_ip, without_ip) > MIN_EFFECT, f"{name} {execution}: the adapter changed nothing"


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_matches_own_attention_identity(name, cfg):
    """SD3 and Flux against the independent perturbed pass (identity on the selected heads of the layer's own
    attention calls only, the adapter's calls plain), folded in by the reference hook."""
    make, inputs, _, heads = FAMILIES[name]
    pipe = make()
    kw = inputs(**({"true_cfg_scale": 4.0 if cfg else 1.0} if name == "flux" else {"cfg": 5.0 if cfg else 1.0}))
    names = dict(zip(_selected(pipe, heads), heads.values()))
    model, modes = own_identity_copy(pipe, names)
    calls = {"calls": "separate", "cfg": cfg} if name == "flux" else {}
    check_matches_reference(pipe, kw, heads, module_pass(model), scale=3.0, kind="fp32", mode="joint", u=1, **calls)
    ip_layer = next(iter(names))  # both families: the first selected layer has the adapter's processor
    assert modes[ip_layer].own_calls > 0 and modes[ip_layer].branch_calls == modes[ip_layer].own_calls


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("name,peer", [("sd15", StableDiffusionPAGPipeline), ("sdxl", StableDiffusionXLPAGPipeline)])
def test_unet_matches_diffusers_pag_pipeline(name, peer, cfg):
    """Every head of the mid block's layers (SDXL's mid block has two), against diffusers' PAG pipeline with
    ``pag_applied_layers="mid"``, given the same ``ip_adapter_image_embeds`` (a batch of two prompts)."""
    make, inputs, _, _ = FAMILIES[name]
    pipe = make()
    kw = inputs(cfg=cfg, batch=2)
    mid = ",".join(f"{x.index}:*" for x in headpag.list_layers(pipe) if x.name.startswith("mid_block"))
    extra = {"requires_safety_checker": False} if peer is StableDiffusionPAGPipeline else {}
    check_matches_peer(pipe, kw, peer, mid, rows=(2,), pag_applied_layers="mid", **extra)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_adapter_branch_is_never_routed(name, monkeypatch):
    """Every attention call headpag takes on an adapter layer has the queries' own tokens as keys; the adapter's
    call of each such layer is passed to diffusers, once per guided forward."""
    make, inputs, _, heads = FAMILIES[name]
    pipe = make()
    seen = []
    attend = routing.LayerRoute.attend

    def spy(self, q, k, v, *, layout, **kwargs):
        tokens = 2 if layout == "bhnd" else 1
        seen.append((self, q.shape[tokens], k.shape[tokens]))
        return attend(self, q, k, v, layout=layout, **kwargs)

    monkeypatch.setattr(routing.LayerRoute, "attend", spy)
    guided(pipe, "fused", heads, inputs(), scale=3.0)
    assert seen and all(n_q == n_k for _, n_q, n_k in seen)
    ip_layer = _selected(pipe, heads)[0]
    routes = [route for route, _, _ in seen if route.layer == ip_layer]
    assert routes and all(route.calls == 1 and route.passed == 1 for route in routes)


def test_custom_processor_still_refused():
    """Accepting the IP-Adapter processors did not open the door to others: a user processor on a selected layer
    raises, naming the accepted classes."""
    pipe = IP.sd3_ip()

    class MyProcessor(type(pipe.transformer.transformer_blocks[0].attn.processor)):
        pass

    pipe.transformer.transformer_blocks[0].attn.set_processor(MyProcessor(
        hidden_size=32, ip_hidden_states_dim=32, head_dim=8, timesteps_emb_dim=64))
    with pytest.raises(ValueError, match="MyProcessor.*SD3IPAdapterJointAttnProcessor2_0"):
        headpag.enable_fused(pipe, {0: [0]})
    assert not hasattr(pipe.transformer, "_diffusers_hook") or not pipe.transformer._diffusers_hook.hooks


def test_unrouted_adapter_layer_raises(monkeypatch):
    """The "no attention call was routed" check holds on adapter layers: an IP-Adapter processor whose own attention
    is computed outside SDPA / dispatch (here: a processor that makes the adapter's call only) raises, naming the
    layer."""
    pipe = IP.flux_ip()
    processor = pipe.transformer.transformer_blocks[0].attn.processor
    cls = type(processor)

    def adapter_only(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, ip_hidden_states=None, ip_adapter_masks=None):
        out = torch.nn.functional.scaled_dot_product_attention(
            attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2),
            *(self.to_k_ip[0](ip_hidden_states[0]).unflatten(-1, (attn.heads, -1)).transpose(1, 2),) * 2,
        ).transpose(1, 2).flatten(2)
        return out, encoder_hidden_states, torch.zeros_like(out)

    monkeypatch.setattr(cls, "__call__", adapter_only)
    with pytest.raises(RuntimeError, match="transformer_blocks.0.attn ran no attention through headpag"):
        guided(pipe, "fused", {0: [0]}, IP.flux_ip_inputs(true_cfg_scale=1.0, steps=1), scale=3.0)
