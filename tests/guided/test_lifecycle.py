"""headpag on real (tiny) diffusers pipelines: peers, fused == eager, exact restoration, interval, fork, SLG,
processor rules, bad input, bf16 and torch.compile.

Pipelines come from tests/pipelines.py (SD3, SD3.5-style, SD1.5, SDXL, DiT; 8x8 latents, 2-4 steps). "plain" is
the unpatched pipeline's output for the same inputs and seed. References, besides ``enable_eager``:

- diffusers' ``StableDiffusion3PAGPipeline`` / ``StableDiffusionPAGPipeline`` built from the same components
  (layer-level PAG == every head of that layer with ``u = 1``);
- ``diffusers.hooks.apply_layer_skip(..., skip_attention_scores=True)`` on a copy of a UNet as the perturbed pass,
  combined in a plain pipeline by a forward hook with DESIGN.md's formula (:func:`reference_hook`);
- diffusers' ``PAGJointAttnProcessor2_0`` on a copy of the SD3 transformer for skip-layer guidance.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3PAGPipeline, StableDiffusionPAGPipeline
from diffusers.hooks import HookRegistry, LayerSkipConfig, ModelHook, apply_layer_skip
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0, PAGJointAttnProcessor2_0

import headpag
import pipelines as P

# --- the one place for tolerances -------------------------------------------------------------------------------
# torch.testing.assert_close(actual, expected, atol=atol * max(1, max|expected|), rtol=rtol) on float32 copies.
TOL = {
    # fp32 pipelines against diffusers' PAG pipelines (observed max |diff| <= 1.1e-6 * scale)
    "peer": dict(atol=5e-5, rtol=5e-5),
    # fp32 fused vs eager, or vs a reference built from diffusers' hooks/processors (observed <= 1.8e-6 * scale)
    "fp32": dict(atol=5e-5, rtol=5e-5),
    # the whole pipeline in bfloat16 on CPU, fused vs eager: different rounding orders, amplified over the steps
    # (observed max |fused - eager| = 1.3% (SD3) and 2.1% (SD1.5) of max |output|; bf16 itself moves the fp32
    # result by 30-45% of the guidance effect's norm, fused and eager alike)
    "bf16": dict(atol=4e-2, rtol=4e-2),
    # torch.compile(inductor) of the patched denoiser vs the same patched denoiser uncompiled (fp32)
    "compile": dict(atol=5e-5, rtol=5e-5),
}
# A guided output must differ from the plain one by more than this (so that no comparison is vacuous).
MIN_EFFECT = 1e-3
# bf16: ||fused - eager|| must stay below this fraction of the guidance effect ||eager - plain|| (observed 0.13
# on SD3, 0.38 on SD1.5)
BF16_EFFECT_RATIO = 0.5

ENABLE = {"fused": headpag.enable_fused, "eager": headpag.enable_eager}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add synchronisation (on a busy 2-core machine a 16-channel 8x8
    conv takes ~25 ms with 2 threads and ~0.5 ms with 1)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def close(actual: torch.Tensor, expected: torch.Tensor, kind: str, msg: str = "") -> None:
    """``assert_close`` with ``TOL[kind]``; ``atol`` is relative to the output's scale, ``max(1, max |expected|)``
    (Euler-scheduled SDXL latents reach ~300 after two steps of a random UNet)."""
    expected = expected.float()
    scale = max(1.0, float(expected.abs().max()))
    tol = dict(TOL[kind], atol=TOL[kind]["atol"] * scale)
    torch.testing.assert_close(actual.float(), expected, **tol, msg=(lambda m: f"{msg}\n{m}") if msg else None)


def effect(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def guided(pipe, execution: str, heads, inputs: dict, **kwargs) -> torch.Tensor:
    """The output of ``pipe(**inputs)`` with headpag enabled for this one run."""
    ENABLE[execution](pipe, heads, **kwargs)
    try:
        return P.run(pipe, inputs)
    finally:
        headpag.disable(pipe)


def attention_modules(den: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module with a ``processor`` (works for DiT, which has no ``attn_processors``)."""
    return {name: m for name, m in den.named_modules() if hasattr(m, "processor")}


def snapshot(pipe) -> dict:
    """What enable/disable must leave as it found: processor identities, hook registries, forward methods."""
    den = P.denoiser(pipe)
    snap = {
        "processors": {name: id(m.processor) for name, m in attention_modules(den).items()},
        "registries": {name: (tuple(m._diffusers_hook.hooks) if hasattr(m, "_diffusers_hook") else None)
                       for name, m in den.named_modules()},
        # a hook wrapper replaces the instance's forward; restored means calling .forward calls the class's forward
        "forwards": {name: bool(inspect.ismethod(m.forward) and m.forward.__func__ is type(m).forward
                                and m.forward.__self__ is m) for name, m in den.named_modules()},
    }
    if hasattr(den, "attn_processors"):
        snap["attn_processors"] = {k: id(v) for k, v in den.attn_processors.items()}
    return snap


def layer_index(pipe, prefix: str) -> int:
    """Index of the first layer whose module name starts with ``prefix``."""
    return next(layer.index for layer in headpag.list_layers(pipe) if layer.name.startswith(prefix))


def n_layers(pipe) -> int:
    return len(headpag.list_layers(pipe))


def record_rows(modules: dict[str, torch.nn.Module]):
    """Forward pre-hooks recording the leading dim of the first tensor argument of each module, per call."""
    log: dict[str, list[int]] = {name: [] for name in modules}

    def make(name):
        def hook(module, args, kwargs):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            log[name].append(x.shape[0])

        return hook

    handles = [m.register_forward_pre_hook(make(name), with_kwargs=True) for name, m in modules.items()]
    return log, handles


# ================================================================================================================
# 1. Peers: diffusers' layer-level PAG pipelines
# ================================================================================================================


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no_cfg"])
def test_sd3_matches_diffusers_pag_pipeline(cfg):
    pipe = P.sd3()
    inputs = P.sd3_inputs(batch=2, num_images_per_prompt=2, cfg=cfg)
    plain = P.run(pipe, inputs)
    pag = P.peer(pipe, StableDiffusion3PAGPipeline, pag_applied_layers=[r"blocks\.1\.attn$"])
    expected = P.run(pag, {**inputs, "pag_scale": 3.0})
    assert expected.shape[0] == 4 and effect(expected, plain) > MIN_EFFECT
    for execution in ENABLE:
        out = guided(pipe, execution, "1:*", inputs, scale=3.0, u=1, mode="image")
        close(out, expected, "peer", f"{execution}, guidance_scale={cfg}")


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg", "no_cfg"])
def test_sd15_matches_diffusers_pag_pipeline(cfg):
    pipe = P.sd15()
    inputs = P.sd15_inputs(batch=2, num_images_per_prompt=2, cfg=cfg)
    plain = P.run(pipe, inputs)
    pag = P.peer(pipe, StableDiffusionPAGPipeline, requires_safety_checker=False, pag_applied_layers="mid")
    expected = P.run(pag, {**inputs, "pag_scale": 3.0})
    assert expected.shape[0] == 4 and effect(expected, plain) > MIN_EFFECT
    mid = layer_index(pipe, "mid_block")
    for execution in ENABLE:
        out = guided(pipe, execution, f"{mid}:*", inputs, scale=3.0, u=1, mode="joint")
        close(out, expected, "peer", f"{execution}, guidance_scale={cfg}")


# ================================================================================================================
# 2. mode="joint": fused == eager everywhere; UNet against diffusers' apply_layer_skip
# ================================================================================================================

# Head selections, given the number of layers n: a multi-head subset of one layer, SoftPAG, several layers with
# mixed per-head u (including a wildcard layer).
SELECTIONS = {
    "subset": (lambda n: f"{n // 2}:0,{n // 2}:2", None),
    "soft": (lambda n: f"{n - 1}:1,{n - 1}:3", 0.5),
    "several_layers": (lambda n: f"0:1,{n // 2}:*@0.5,{n - 1}:0,{n - 1}:3@0.25", None),
}


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("model", ["sd3", "sd35", "sd15", "sdxl", "dit"])
def test_fused_equals_eager(model, selection, cfg):
    factory, make_inputs = P.FACTORIES[model]
    pipe = factory()
    inputs = make_inputs(batch=2, **({} if cfg else {"cfg": 1.0}))
    spec, u = SELECTIONS[selection]
    heads = spec(n_layers(pipe))
    plain = P.run(pipe, inputs)
    eager = guided(pipe, "eager", heads, inputs, scale=2.0, u=u)
    fused = guided(pipe, "fused", heads, inputs, scale=2.0, u=u)
    assert effect(eager, plain) > MIN_EFFECT, "the selection does not change the output: vacuous comparison"
    close(fused, eager, "fp32", f"{model} {heads} u={u}")


def reference_hook(pipe, perturbed_unet: torch.nn.Module, scale: float):
    """A forward hook on ``pipe.unet`` that turns the plain pipeline into the guided one (DESIGN.md):
    ``delta = w * (cond - perturbed)``, with ``perturbed`` = ``perturbed_unet`` on the cond rows, added to the cond
    and uncond rows alike, so that the pipeline's CFG arithmetic gives ``uncond + s (cond - uncond) + delta``."""

    def hook(module, args, kwargs, output):
        sample = output[0]
        n = sample.shape[0]
        cond = slice(n // 2, n) if pipe.do_classifier_free_guidance else slice(0, n)

        def take(v):
            if isinstance(v, dict):
                return {k: take(x) for k, x in v.items()}
            return v[cond] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v

        perturbed = perturbed_unet(*[take(a) for a in args], **{k: take(v) for k, v in kwargs.items()})[0]
        delta = scale * (sample[cond] - perturbed)
        out = sample.clone()
        out[cond] += delta
        if cond.start:
            out[: cond.start] += delta
        return (out, *output[1:])

    return pipe.unet.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("model,prefix", [
    ("sd15", "down_blocks.0.attentions.0"),  # followed by resnets[1] in the same down block: the fork-unit case
    ("sd15", "mid_block"),
    ("sd15", "up_blocks.1.attentions.2"),  # the last layer
    ("sdxl", "down_blocks.1.attentions.0.transformer_blocks.1"),  # 2nd BasicTransformerBlock of a Transformer2DModel
])
def test_unet_matches_apply_layer_skip(model, prefix, cfg):
    factory, make_inputs = P.FACTORIES[model]
    pipe = factory()
    inputs = make_inputs(batch=2, **({} if cfg else {"cfg": 1.0}))
    layer = headpag.list_layers(pipe)[layer_index(pipe, prefix)]
    fqn, block = layer.name.rsplit(".", 1)[0].rsplit(".", 1)  # "<...>.transformer_blocks", "<k>" (".attn1" dropped)
    skipping = copy.deepcopy(pipe.unet)
    apply_layer_skip(skipping, LayerSkipConfig(indices=[int(block)], fqn=fqn, skip_attention=False,
                                               skip_attention_scores=True, skip_ff=False))
    handle = reference_hook(pipe, skipping, scale=3.0)
    try:
        expected = P.run(pipe, inputs)
    finally:
        handle.remove()
    plain = P.run(pipe, inputs)
    assert effect(expected, plain) > MIN_EFFECT
    for execution in ENABLE:
        out = guided(pipe, execution, f"{layer.index}:*", inputs, scale=3.0, mode="joint")
        close(out, expected, "fp32", f"{execution} {layer.name}")


# ================================================================================================================
# 3. scale=0, disable, enable twice, the context manager, configure
# ================================================================================================================


@pytest.mark.parametrize("execution", list(ENABLE))
@pytest.mark.parametrize("model", ["sd3", "sd35", "sd15", "sdxl", "dit"])
def test_scale_zero_and_disable_restore_exactly(model, execution):
    factory, make_inputs = P.FACTORIES[model]
    pipe = factory()
    inputs = make_inputs()
    before = snapshot(pipe)
    assert not any(before["registries"].values())
    plain = P.run(pipe, inputs)
    n = n_layers(pipe)
    heads = f"0:0,{n - 1}:1"

    ENABLE[execution](pipe, heads, scale=0.0)
    assert torch.equal(P.run(pipe, inputs), plain)
    ENABLE[execution](pipe, heads, scale=3.0)  # enabling again replaces the settings
    during = snapshot(pipe)
    assert during["processors"] == before["processors"], "headpag must not swap processors"
    assert effect(P.run(pipe, inputs), plain) > MIN_EFFECT
    assert snapshot(pipe)["processors"] == before["processors"]
    headpag.disable(pipe)

    after = snapshot(pipe)
    assert after == before
    assert not hasattr(P.denoiser(pipe), "_diffusers_hook")
    assert torch.equal(P.run(pipe, inputs), plain)
    headpag.disable(pipe)  # no-op when not patched
    assert snapshot(pipe) == before


def test_disable_keeps_a_users_registry():
    """A registry (and hook) the user had on the denoiser stays; only headpag's hooks go."""
    pipe = P.sd3()
    inputs = P.sd3_inputs()
    plain = P.run(pipe, inputs)
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(ModelHook(), "user")
    before = snapshot(pipe)
    headpag.enable_fused(pipe, "1:0", scale=3.0)
    assert effect(P.run(pipe, inputs), plain) > MIN_EFFECT
    headpag.disable(pipe)
    assert pipe.transformer._diffusers_hook is registry and list(registry.hooks) == ["user"]
    assert snapshot(pipe)["processors"] == before["processors"]
    assert snapshot(pipe)["registries"] == before["registries"]
    assert torch.equal(P.run(pipe, inputs), plain)


def test_enable_twice_never_stacks():
    pipe = P.sd3()
    inputs = P.sd3_inputs()
    plain = P.run(pipe, inputs)
    before = snapshot(pipe)
    only_second = guided(pipe, "fused", "2:1,2:3", inputs, scale=2.0)

    headpag.enable_fused(pipe, "1:0", scale=3.0)
    headpag.enable_fused(pipe, "2:1,2:3", scale=2.0)
    close(P.run(pipe, inputs), only_second, "fp32")
    headpag.enable_eager(pipe, "2:1,2:3", scale=0.0)  # switching execution replaces too
    assert torch.equal(P.run(pipe, inputs), plain)
    headpag.enable_fused(pipe, "1:0", scale=3.0)
    headpag.enable_fused(pipe, "1:0", scale=0.0)
    assert torch.equal(P.run(pipe, inputs), plain)
    headpag.disable(pipe)  # one disable removes everything
    assert snapshot(pipe) == before
    assert torch.equal(P.run(pipe, inputs), plain)


def test_context_manager_disables_on_exit_and_on_exception():
    pipe = P.sd15()
    inputs = P.sd15_inputs()
    plain = P.run(pipe, inputs)
    before = snapshot(pipe)
    expected = guided(pipe, "fused", "1:0,1:1", inputs, scale=3.0)
    with headpag.fused(pipe, "1:0,1:1", scale=3.0) as p:
        assert p is pipe
        assert torch.equal(P.run(pipe, inputs), expected)
    assert snapshot(pipe) == before
    assert torch.equal(P.run(pipe, inputs), plain)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with headpag.fused(pipe, "1:0", scale=3.0):
            P.run(pipe, inputs)
            raise Boom
    assert snapshot(pipe) == before
    assert torch.equal(P.run(pipe, inputs), plain)


@pytest.mark.parametrize("execution", list(ENABLE))
def test_configure_matches_a_fresh_enable(execution):
    pipe = P.sd3()
    inputs = P.sd3_inputs(batch=2)
    before = snapshot(pipe)
    fresh = {
        "scale": guided(pipe, execution, "1:0,1:2", inputs, scale=5.0),
        "heads": guided(pipe, execution, "2:1,2:3", inputs, scale=5.0),
        "u": guided(pipe, execution, "2:1,2:3", inputs, scale=5.0, u=0.5),
        "interval": guided(pipe, execution, "2:1,2:3", inputs, scale=5.0, u=0.5, interval=(0.5, 1.0)),
        "mode": guided(pipe, execution, "2:1,2:3", inputs, scale=5.0, u=0.5, interval=(0.5, 1.0), mode="image"),
    }
    ENABLE[execution](pipe, "1:0,1:2", scale=3.0)
    first = P.run(pipe, inputs)
    headpag.configure(pipe, scale=5.0)
    changed = P.run(pipe, inputs)
    assert effect(changed, first) > MIN_EFFECT
    close(changed, fresh["scale"], "fp32", "configure(scale=)")
    headpag.configure(pipe, heads="2:1,2:3")
    close(P.run(pipe, inputs), fresh["heads"], "fp32", "configure(heads=)")
    attn1 = pipe.transformer.transformer_blocks[1].attn
    assert not getattr(attn1, "_diffusers_hook", None) or not attn1._diffusers_hook.hooks, "old layer still hooked"
    headpag.configure(pipe, u=0.5)
    close(P.run(pipe, inputs), fresh["u"], "fp32", "configure(u=)")
    headpag.configure(pipe, interval=(0.5, 1.0))
    close(P.run(pipe, inputs), fresh["interval"], "fp32", "configure(interval=)")
    headpag.configure(pipe, mode="image")
    close(P.run(pipe, inputs), fresh["mode"], "fp32", "configure(mode=)")
    headpag.disable(pipe)
    assert snapshot(pipe) == before
    with pytest.raises(ValueError, match="not patched"):
        headpag.configure(pipe, scale=1.0)


# ================================================================================================================
# 4. The PAG interval
# ================================================================================================================


@pytest.mark.parametrize("interval,guided_steps", [((0.0, 0.0), []), ((0.0, 0.5), [0, 1]), ((0.5, 1.0), [2, 3])])
def test_interval_widens_only_guided_steps(interval, guided_steps):
    pipe = P.sd3()
    inputs = P.sd3_inputs(steps=4)  # batch 1 with CFG: 2 base rows, 1 twin
    plain = P.run(pipe, inputs)
    last = pipe.transformer.transformer_blocks[-1]
    outs = {}
    for execution in ENABLE:
        ENABLE[execution](pipe, "1:0,1:2", scale=3.0, interval=interval)
        log, handles = record_rows({"last": last})
        try:
            outs[execution] = P.run(pipe, inputs)
        finally:
            for h in handles:
                h.remove()
            headpag.disable(pipe)
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
# 5. Fork evidence: units before the fork see only the base rows
# ================================================================================================================


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
def test_sd3_fork_at_the_last_block(cfg):
    # Inner modules are observed (norm1 gets the block's hidden states): a forward pre-hook on the block itself
    # would see the arguments before headpag's hook narrows them.
    pipe = P.sd3()
    inputs = P.sd3_inputs(batch=2, **({} if cfg else {"cfg": 1.0}))
    n_cond = 2
    n_base = 2 * n_cond if cfg else n_cond
    blocks = {f"block{i}": b.norm1 for i, b in enumerate(pipe.transformer.transformer_blocks)}
    blocks["norm_out"] = pipe.transformer.norm_out
    headpag.enable_fused(pipe, "2:1", scale=3.0)
    log, handles = record_rows(blocks)
    try:
        P.run(pipe, inputs)
    finally:
        for h in handles:
            h.remove()
        headpag.disable(pipe)
    steps = inputs["num_inference_steps"]
    assert log["block0"] == log["block1"] == [n_base] * steps
    assert log["block2"] == log["norm_out"] == [n_base + n_cond] * steps


def test_unet_fork_units():
    """SD1.5: a head in the last up layer forks at up_blocks.1; a head in down_blocks.0.attentions.1 forks at the
    whole down_blocks.0 (its resnets[0] already carries the twins)."""
    pipe = P.sd15()
    inputs = P.sd15_inputs(batch=2)  # 4 base rows, 2 twins
    unet = pipe.unet
    units = {"down0": unet.down_blocks[0].resnets[0], "down1": unet.down_blocks[1].resnets[0],
             "mid": unet.mid_block.resnets[0], "up0": unet.up_blocks[0].resnets[0], "up1": unet.up_blocks[1].resnets[0],
             "conv_out": unet.conv_out}
    expected = {
        "up_blocks.1.attentions.2": {"down0": 4, "down1": 4, "mid": 4, "up0": 4, "up1": 6, "conv_out": 6},
        "down_blocks.0.attentions.1": {name: 6 for name in units},
        "mid_block": {"down0": 4, "down1": 4, "mid": 6, "up0": 6, "up1": 6, "conv_out": 6},
    }
    for prefix, rows in expected.items():
        headpag.enable_fused(pipe, f"{layer_index(pipe, prefix)}:1", scale=3.0)
        log, handles = record_rows(units)
        try:
            P.run(pipe, inputs)
        finally:
            for h in handles:
                h.remove()
            headpag.disable(pipe)
        assert {name: set(v) for name, v in log.items()} == {name: {n} for name, n in rows.items()}, prefix


def test_dit_fork_rows():
    pipe = P.dit()
    inputs = P.dit_inputs(batch=2)  # rows [cond, cond, uncond, uncond] + 2 twins
    blocks = {f"block{i}": b.norm1 for i, b in enumerate(pipe.transformer.transformer_blocks)}
    headpag.enable_fused(pipe, "1:0,1:3", scale=3.0)
    log, handles = record_rows(blocks)
    try:
        P.run(pipe, inputs)
    finally:
        for h in handles:
            h.remove()
        headpag.disable(pipe)
    assert set(log["block0"]) == {4} and set(log["block1"]) == {6} and set(log["block2"]) == {6}


# ================================================================================================================
# 6. SD3 skip-layer guidance together with PAG
# ================================================================================================================


def sd3_pag_reference_hook(pipe, scale: float, layer: int):
    """The plain SD3 pipeline made into PAG + SLG by a forward hook: the perturbed pass is diffusers'
    ``PAGJointAttnProcessor2_0`` on layer ``layer`` of a copy of the transformer (rows [cond, cond] -> the second
    half is perturbed). Main calls get ``delta`` on the uncond and cond rows, the skip-layer call of the same step
    gets it too, so the pipeline computes ``u + s (c - u) + w (c - p) + s_slg (c - slg)``."""
    perturbed = copy.deepcopy(pipe.transformer)
    perturbed.transformer_blocks[layer].attn.processor = PAGJointAttnProcessor2_0()
    state = {}

    def hook(module, args, kwargs, output):
        sample = output[0]
        if kwargs.get("skip_layers") is not None:
            return (sample + state["delta"], *output[1:])
        n = sample.shape[0]
        cond = slice(n // 2, n) if pipe.do_classifier_free_guidance else slice(0, n)
        twice = {k: (torch.cat([v[cond], v[cond]]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
                 for k, v in kwargs.items()}
        p = perturbed(**twice)[0][cond.stop - cond.start:]
        state["delta"] = delta = scale * (sample[cond] - p)
        out = sample.clone()
        out[cond] += delta
        if cond.start:
            out[: cond.start] += delta
        return (out, *output[1:])

    return pipe.transformer.register_forward_hook(hook, with_kwargs=True)


def test_sd3_skip_layer_guidance_with_pag():
    pipe = P.sd3()
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
               skip_layer_guidance_scale=2.0)
    inputs = P.sd3_inputs(steps=3, **slg)  # SLG runs on steps 1 and 2 (i > start * T)
    plain_slg = P.run(pipe, inputs)
    no_slg = P.run(pipe, {k: v for k, v in inputs.items() if k not in slg})
    handle = sd3_pag_reference_hook(pipe, 3.0, 1)
    try:
        expected = P.run(pipe, inputs)
    finally:
        handle.remove()
    assert effect(expected, plain_slg) > MIN_EFFECT and effect(plain_slg, no_slg) > MIN_EFFECT

    calls = []
    record = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append("slg" if k.get("skip_layers") is not None else "main"), with_kwargs=True)
    try:
        for execution in ENABLE:
            calls.clear()
            log, handles = record_rows({"block1": pipe.transformer.transformer_blocks[1].norm1})
            try:
                out = guided(pipe, execution, "1:*", inputs, scale=3.0, mode="image")
            finally:
                for h in handles:
                    h.remove()
            close(out, expected, "fp32", execution)
            assert calls == ["main", "main", "slg", "main", "slg"]
            if execution == "fused":  # the skip-layer call keeps its single cond row
                assert log["block1"] == [3, 3, 1, 3, 1]
            else:
                assert log["block1"] == [2, 1, 2, 1, 1, 2, 1, 1]
        assert torch.equal(guided(pipe, "fused", "1:*", inputs, scale=0.0), plain_slg)
    finally:
        record.remove()


# ================================================================================================================
# 7. Processors: untouched on unselected layers; non-default processors and attention masks raise
# ================================================================================================================


class CustomProcessor(AttnProcessor2_0):
    """Computes exactly what AttnProcessor2_0 does, but is not a default processor."""


def test_unselected_layers_keep_their_processors():
    pipe = P.sd15()
    unet = pipe.unet
    before = snapshot(pipe)
    selected = headpag.list_layers(pipe)[2].name
    headpag.enable_fused(pipe, "2:0,2:3", scale=3.0)
    try:
        P.run(pipe, P.sd15_inputs())
        assert snapshot(pipe)["processors"] == before["processors"]
        assert snapshot(pipe)["attn_processors"] == before["attn_processors"]
        for name, module in attention_modules(unet).items():
            hooks = getattr(module, "_diffusers_hook", None)
            names = list(hooks.hooks) if hooks is not None else []
            assert bool(names) == (name == selected), (name, names)
    finally:
        headpag.disable(pipe)


def test_non_default_processor_on_a_selected_layer_raises():
    pipe = P.sd15()
    inputs = P.sd15_inputs()
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
    headpag.enable_fused(pipe, "0:0,3:1", scale=3.0)
    try:
        expected = P.run(pipe, inputs)
        with pytest.raises(ValueError, match="CustomProcessor"):
            headpag.configure(pipe, heads="2:1")
        assert torch.equal(P.run(pipe, inputs), expected)
    finally:
        headpag.disable(pipe)
    assert snapshot(pipe) == before


def test_diffusers_pag_processor_left_on_sd3_raises():
    pipe = P.sd3()
    pipe.transformer.transformer_blocks[1].attn.processor = PAGJointAttnProcessor2_0()
    with pytest.raises(ValueError, match="PAGJointAttnProcessor2_0"):
        headpag.enable_fused(pipe, "1:0")
    headpag.enable_fused(pipe, "2:0")  # another layer is fine
    headpag.disable(pipe)
    pipe.transformer.transformer_blocks[1].attn.processor = JointAttnProcessor2_0()
    headpag.enable_fused(pipe, "1:0")
    headpag.disable(pipe)


@pytest.mark.parametrize("execution", list(ENABLE))
def test_attention_mask_on_a_selected_layer_raises(execution):
    pipe = P.sd15()
    inputs = P.sd15_inputs()
    attn = pipe.unet.get_submodule(headpag.list_layers(pipe)[0].name)

    def add_mask(module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        return args, {**kwargs, "attention_mask": torch.zeros(hs.shape[0], 1, hs.shape[1])}

    ENABLE[execution](pipe, "0:1", scale=3.0)
    try:
        expected = P.run(pipe, inputs)
        handle = attn.register_forward_pre_hook(add_mask, with_kwargs=True)
        try:
            with pytest.raises(ValueError, match="attention mask"):
                P.run(pipe, inputs)
        finally:
            handle.remove()
        assert torch.equal(P.run(pipe, inputs), expected), "the failed call left state behind"
    finally:
        headpag.disable(pipe)
    # an unselected layer may take a mask
    ENABLE[execution](pipe, "2:1", scale=3.0)
    handle = attn.register_forward_pre_hook(add_mask, with_kwargs=True)
    try:
        P.run(pipe, inputs)
    finally:
        handle.remove()
        headpag.disable(pipe)


# ================================================================================================================
# 8. Bad input is rejected before any sampling
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
    pipe = P.sd3()
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
    inputs = P.sd3_inputs()
    headpag.enable_fused(pipe, "1:0", scale=3.0)
    try:
        expected = P.run(pipe, inputs)
        n_calls = len(calls)
        with pytest.raises(error, match=match):
            headpag.configure(pipe, **kwargs)
        assert len(calls) == n_calls
        assert torch.equal(P.run(pipe, inputs), expected)
    finally:
        headpag.disable(pipe)
    assert snapshot(pipe)["processors"] == before["processors"]


def test_unsupported_pipelines_raise():
    pipe = P.sd3()
    pag = P.peer(pipe, StableDiffusion3PAGPipeline, pag_applied_layers=[r"blocks\.1\.attn$"])
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


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_guidance_rescale_raises_at_call_time(model):
    factory, make_inputs = P.FACTORIES[model]
    pipe = factory()
    inputs = make_inputs()
    for execution in ENABLE:
        ENABLE[execution](pipe, "0:0", scale=3.0)
        try:
            with pytest.raises(ValueError, match="guidance_rescale"):
                P.run(pipe, {**inputs, "guidance_rescale": 0.7})
            P.run(pipe, {**inputs, "guidance_rescale": 0.0})
        finally:
            headpag.disable(pipe)


# ================================================================================================================
# 9. bfloat16 and torch.compile
# ================================================================================================================


def to_dtype(inputs: dict, dtype) -> dict:
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


@pytest.mark.parametrize("model", ["sd3", "sd15"])
def test_bfloat16(model):
    factory, make_inputs = P.FACTORIES[model]
    pipe = factory().to(torch.bfloat16)
    inputs = to_dtype(make_inputs(batch=2), torch.bfloat16)
    plain = P.run(pipe, inputs)
    assert plain.dtype == torch.bfloat16
    heads = f"1:0,1:2,{n_layers(pipe) - 1}:1@0.5"
    eager = guided(pipe, "eager", heads, inputs, scale=3.0)
    fused = guided(pipe, "fused", heads, inputs, scale=3.0)
    assert fused.dtype == torch.bfloat16
    close(fused, eager, "bf16")
    fused, eager, plain = fused.float(), eager.float(), plain.float()
    assert (fused - eager).norm() < BF16_EFFECT_RATIO * (eager - plain).norm()
    assert torch.equal(guided(pipe, "fused", heads, inputs, scale=0.0), plain)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_inductor_matches_uncompiled(fresh_dynamo):
    """Enable first, then compile the patched denoiser. One small run: inductor's first (cold-cache) compile takes
    ~75 s on this busy 2-core machine, ~10 s once /tmp/torchinductor_<user> holds the compiled kernels."""
    pipe = P.sd3(num_layers=1)
    inputs = P.sd3_inputs(steps=1)
    plain = P.run(pipe, inputs)
    headpag.enable_fused(pipe, "0:0,0:2", scale=3.0)
    try:
        expected = P.run(pipe, inputs)
        pipe.transformer = torch.compile(pipe.transformer, backend="inductor")
        out = P.run(pipe, inputs)
    finally:
        headpag.disable(pipe)
    assert effect(expected, plain) > MIN_EFFECT
    close(out, expected, "compile")


@pytest.fixture(scope="module")
def compiled_sd3_counts():
    """A 4-step SD3 run with interval (0, 0.5) (steps 0-1 fork, 2-3 do not) through a counting backend."""
    torch._dynamo.reset()
    pipe = P.sd3(num_layers=2)
    inputs = P.sd3_inputs(steps=4)
    plain = P.run(pipe, inputs)
    headpag.enable_fused(pipe, "1:0,1:2", scale=3.0, interval=(0.0, 0.5))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    try:
        expected = P.run(pipe, inputs)
        pipe.transformer = torch.compile(pipe.transformer, backend=backend)
        out = P.run(pipe, inputs)
        first = list(graphs)
        again = P.run(pipe, inputs)
        rerun = list(graphs)
        headpag.disable(pipe)  # pipe.transformer is the compiled wrapper: disable unwraps it
        after = P.run(pipe, inputs)  # guards on the removed hooks fail: recompiled without them
    finally:
        headpag.disable(pipe)
        torch._dynamo.reset()
    return dict(plain=plain, expected=expected, out=out, again=again, after=after, first=first, rerun=rerun)


def test_compile_traces_the_patch_without_recompiling_on_rerun(compiled_sd3_counts):
    c = compiled_sd3_counts
    close(c["out"], c["expected"], "compile")
    close(c["again"], c["expected"], "compile")
    assert c["rerun"] == c["first"], "a second identical run compiled again"
    assert effect(c["expected"], c["plain"]) > MIN_EFFECT
    close(c["after"], c["plain"], "compile", "compiled pipeline after disable")


def test_compile_at_most_two_graphs(compiled_sd3_counts):
    """One graph per batch layout (fork / no fork), not one per step, and no graph break splitting the model
    (headpag's host-side decisions run outside the graph, under torch.compiler.disable)."""
    assert len(compiled_sd3_counts["first"]) <= 2, f"graphs compiled (node counts): {compiled_sd3_counts['first']}"
