"""``headpag.apps.benchmarks.call_overhead`` on a tiny SD3 pipeline: the operator counts it reports are checked
against what holds by construction (the counts of a plain denoiser forward taken independently, headpag's op once
per selected layer per step, eager's second forward), and its comparison runs every variant under every code
variant."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from headpag.apps.benchmarks import call_overhead, guided_step

# The bench's contenders (heads 6:0, 7:1; diffusers' PAG on layers 4, 6) need 8 layers.
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=8, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
                pos_embed_max_size=8, qk_norm=None)
TINY = guided_step.Setting("tiny", TINY_SD3, latent=8, text=4, device="cpu", dtype=torch.float32, rounds=1, warmup=0,
                           label="tiny CPU setting of the tests")
HEADS = "1:0,2:*"  # two selected layers; the fork at block 1, so block 0 runs the base rows only


class _Plain(TorchDispatchMode):
    """An independent count: every dispatched operator, nothing special-cased."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model():
    return call_overhead.sd3_model(TINY)


def variant(model, name):
    return next(v for v in model.variants if v.name == name)


def per_step(model, name, heads=None):
    v = variant(model, name)
    if heads is not None:
        v = call_overhead.Variant(v.name, v.kind, heads, v.mode)
    with call_overhead.activated(model, v) as step:
        return call_overhead.count_ops_per_step(step), step


def test_plain_step_counts_what_an_independent_counter_counts(model):
    counted, step = per_step(model, "cfg")
    independent = []
    for n in (1, 2):
        with _Plain() as c:
            step(n)
        independent.append(c.n)
    assert counted.ops == independent[1] - independent[0] > 0
    assert counted.inner == counted.headpag_ops == 0
    # One step: at least one forward of the denoiser, counted on its own.
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 4, 16),
                  pooled_projections=torch.randn(2, 8), timestep=torch.tensor([1.0, 1.0]), return_dict=False)
    with torch.no_grad(), _Plain() as c:
        model.pipe.transformer(**inputs)
    assert counted.ops > c.n


def test_counts_are_per_step(model):
    with call_overhead.activated(model, variant(model, "fused-heads")) as step:
        one = call_overhead.count_ops_per_step(step, steps=1)
        two = call_overhead.count_ops_per_step(step, steps=2)
    assert one == two


@pytest.mark.parametrize("fused, eager", [("fused-heads", "eager-heads"), ("fused-layers", "eager-layers")])
def test_fused_dispatches_headpags_op_once_per_layer_and_fewer_ops_than_eager(model, fused, eager):
    f, _ = per_step(model, fused, HEADS)
    e, _ = per_step(model, eager, HEADS)
    cfg, _ = per_step(model, "cfg")
    # Fused: one launch of headpag's op per selected layer and step (the kernel on a GPU), its torch path inside.
    assert f.headpag_ops == 2 and f.inner > 0
    # Eager materialises the maps with plain torch ops: no headpag op.
    assert e.headpag_ops == 0 and e.inner == 0
    # Eager runs a second forward on the cond rows; fused runs one forward with the twins, so it dispatches fewer
    # operators even counting those inside headpag's op, and both more than CFG only.
    assert cfg.ops < f.ops + f.inner < e.ops
    assert e.ops - cfg.ops > (f.ops + f.inner - cfg.ops)


def test_compare_runs_every_variant_under_every_code(model):
    calls = []

    @contextlib.contextmanager
    def patched():
        calls.append("entered")
        yield

    rows = call_overhead.compare(model, variants=["cfg", "fused-heads", "diffusers-pag-layers"], repeats=2,
                                 code={"a": contextlib.nullcontext, "b": patched})
    assert [(r["code"], r["variant"]) for r in rows] == [  # in the model's order of variants
        (c, v) for c in "ab" for v in ("cfg", "diffusers-pag-layers", "fused-heads")]
    assert len(calls) == 3  # the warm-up round and two timed rounds
    for r in rows:
        assert r["repeats"] == 2 and r["min_ms"] <= r["ms_per_step"] <= r["max_ms"] and r["ops_per_step"] > 0
    by = {(r["code"], r["variant"]): r for r in rows}
    assert by[("a", "fused-heads")]["headpag_ops_per_step"] == 2  # heads 6:0, 7:1: two layers
    assert by[("a", "cfg")]["ops_per_step"] == by[("b", "cfg")]["ops_per_step"]
    assert len(call_overhead.table(rows).splitlines()) == 2 + len(rows)
    with pytest.raises(ValueError, match="variants must be among"):
        call_overhead.compare(model, variants=["nope"], repeats=1)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        call_overhead.compare(model, repeats=0)


def test_a_refresh_variant_runs_with_its_refresh_and_is_not_counted(model):
    from headpag.guided.session import session_of

    v = variant(model, "fused-heads")
    reused = call_overhead.Variant("fused-heads refresh=2", v.kind, v.heads, v.mode, refresh=2)
    with call_overhead.activated(model, reused):
        assert session_of(model.pipe).settings.refresh == 2
    with call_overhead.activated(model, v):
        assert session_of(model.pipe).settings.refresh == 1
    tiny = call_overhead.Model(model.name, model.pipe, None, model.call, (v, reused), steps=model.steps,
                               pag_scale=model.pag_scale)
    rows = {r["variant"]: r for r in call_overhead.compare(tiny, repeats=1)}
    assert rows["fused-heads"]["ops_per_step"] > 0 and "ops_per_step" not in rows["fused-heads refresh=2"]


def test_the_digits_model_measures_the_demos_refresh_rows():
    from headpag.apps.demo import REFRESH_ROWS

    names = {v.name: v for v in call_overhead.digits_model(seeds=1, steps=2).variants}
    for k in REFRESH_ROWS:
        for kind in ("fused", "eager"):
            v = names[f"{kind} hunted refresh={k}"]
            assert (v.kind, v.heads, v.refresh) == (kind, names["fused hunted"].heads, k)
