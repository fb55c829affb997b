"""``refresh = k``: the perturbed rows run on the first guided step of a sampling run and every k-th step after it;
the guided steps in between run the plain batch and reuse ``cond - perturbed`` times their own PAG scale.

The oracle is written independently of headpag's session: a forward hook on the *unpatched* denoiser that counts the
pipeline's steps, runs a perturbed copy of the denoiser (SDPA under ``PerturbedSDPA``) on the cond rows on refresh
steps, and adds ``scale * difference`` to both halves of every guided step.
"""

from __future__ import annotations

import pytest
import torch

import headpag
from tests.support import checks
from tests.support import models as M
from tests.support.reference import module_pass, sdpa_perturbed_copy
from tests.support.tolerances import MIN_EFFECT, close

STEPS = 6
LAYER = "transformer_blocks.1.attn"


def _refresh_oracle(pipe, scale: float, refresh: int, first: int, adaptive_scale: float = 0.0):
    """A forward hook on ``pipe``'s denoiser (one ``[uncond, cond]`` call per step) folding the reused difference:
    steps ``first, first + refresh, ...`` run the perturbed copy; the steps from ``first`` on are guided."""
    perturbed = module_pass(sdpa_perturbed_copy(pipe, LAYER, "joint", 0))
    state = {"call": 0, "difference": None}

    def hook(module, args, kwargs, output):
        step = state["call"]
        state["call"] += 1
        if step < first:
            return output
        sample = output[0]
        n = sample.shape[0]
        cond = slice(n // 2, n)
        if (step - first) % refresh == 0:
            cond_kwargs = {k: v[cond] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
                           for k, v in kwargs.items()}
            state["difference"] = sample[cond] - perturbed([], cond_kwargs)
        t = float(kwargs["timestep"].flatten()[0])
        w = max(0.0, scale - adaptive_scale * (1000.0 - t)) if adaptive_scale else scale
        out = sample.clone()
        out[: n // 2] += w * state["difference"]
        out[n // 2:] += w * state["difference"]
        return (out, *output[1:])

    return M.denoiser(pipe).register_forward_hook(hook, with_kwargs=True)


def _sd3():
    return M.sd3(), M.sd3_inputs(steps=STEPS, cfg=5.0)


@pytest.mark.parametrize("execution", ["fused", "eager"])
@pytest.mark.parametrize("refresh, interval, adaptive_scale", [
    (2, (0.0, 1.0), 0.0),
    (3, (0.0, 1.0), 0.0),
    (4, (2 / STEPS, 1.0), 0.0),  # the first guided step is step 2
    (2, (0.0, 1.0), 0.002),  # reused steps take their own (adaptive) scale
])
def test_refresh_equals_an_independent_reusing_loop(execution, refresh, interval, adaptive_scale):
    pipe, inputs = _sd3()
    handle = _refresh_oracle(pipe, 2.0, refresh, first=round(interval[0] * STEPS), adaptive_scale=adaptive_scale)
    try:
        expected = M.run(pipe, inputs)
    finally:
        handle.remove()
    every_step = checks.guided(pipe, execution, "1:*", inputs, scale=2.0, interval=interval,
                               adaptive_scale=adaptive_scale)
    reused = checks.guided(pipe, execution, "1:*", inputs, scale=2.0, interval=interval,
                           adaptive_scale=adaptive_scale, refresh=refresh)
    assert checks.effect(reused, every_step) > MIN_EFFECT  # reuse is not recomputation
    close(reused, expected, "fp32")


def test_reused_steps_run_no_perturbed_rows():
    pipe, inputs = _sd3()
    blocks = {name: M.denoiser(pipe).get_submodule(name)
              for name in ("transformer_blocks.0.attn", "transformer_blocks.1.attn")}
    with headpag.fused(pipe, "1:*", scale=2.0, refresh=3), checks.recorded_rows(blocks) as rows:
        M.run(pipe, inputs)
    # [uncond, cond] = 2 rows; the twin joins at its fork unit (block 1) on steps 0 and 3 only
    assert rows["transformer_blocks.0.attn"] == [2] * STEPS
    assert rows["transformer_blocks.1.attn"] == [3, 2, 2, 3, 2, 2]
    with headpag.fused(pipe, "1:*", scale=2.0, refresh=1), checks.recorded_rows(blocks) as rows:
        M.run(pipe, inputs)
    assert rows["transformer_blocks.1.attn"] == [3] * STEPS


def test_refresh_one_is_every_step_bit_for_bit():
    pipe, inputs = _sd3()
    with headpag.fused(pipe, "1:*,2:0", scale=2.0):
        default = M.run(pipe, inputs)
    with headpag.fused(pipe, "1:*,2:0", scale=2.0, refresh=1):
        assert torch.equal(M.run(pipe, inputs), default)


def test_no_difference_crosses_sampling_runs_or_settings():
    pipe, inputs = _sd3()
    headpag.enable_fused(pipe, "1:*", scale=2.0, refresh=4)
    try:
        first = M.run(pipe, inputs)
        assert torch.equal(M.run(pipe, inputs), first)  # the second run starts with a refresh of its own
        other = M.sd3_inputs(steps=STEPS, cfg=5.0, seed=7)
        M.run(pipe, other)
        assert torch.equal(M.run(pipe, inputs), first)
        headpag.configure(pipe, heads="2:*")
        headpag.configure(pipe, heads="1:*")
        assert torch.equal(M.run(pipe, inputs), first)
        # 9 steps, first guided step 6, would reuse the 6-step run's difference (its step 4) by the step count alone
        headpag.configure(pipe, interval=(4 / STEPS, 1.0))
        longer = M.sd3_inputs(steps=9, cfg=5.0)
        alone = M.run(pipe, longer)
        M.run(pipe, inputs)
        assert torch.equal(M.run(pipe, longer), alone)
    finally:
        headpag.disable(pipe)


def test_separate_cond_and_uncond_calls_reuse_one_difference():
    """FLUX.1 with true CFG: the uncond call of a reused step gets the reused delta, as the cond call does."""
    pipe, inputs = M.flux(), M.flux_inputs(steps=4)
    fused = checks.guided(pipe, "fused", "0:*", inputs, scale=2.0, refresh=2)
    eager = checks.guided(pipe, "eager", "0:*", inputs, scale=2.0, refresh=2)
    every_step = checks.guided(pipe, "fused", "0:*", inputs, scale=2.0)
    assert checks.effect(fused, every_step) > MIN_EFFECT
    close(fused, eager, "families")


@pytest.mark.parametrize("refresh, error", [
    (0, ValueError), (-2, ValueError), (1.5, TypeError), (2.0, TypeError), (True, TypeError), ("2", TypeError),
    (None, TypeError),
])
def test_bad_refresh_is_refused(refresh, error):
    pipe, _ = _sd3()
    with pytest.raises(error, match="refresh must be an integer >= 1"):
        headpag.enable_fused(pipe, "1:*", refresh=refresh)
    assert not headpag.is_enabled(pipe)
    headpag.enable_fused(pipe, "1:*", refresh=3)
    with pytest.raises(error, match="refresh must be an integer >= 1"):
        if refresh is None:  # configure's None keeps the setting
            headpag.enable_eager(pipe, "1:*", refresh=None)
        else:
            headpag.configure(pipe, refresh=refresh)
    if refresh is not None:
        assert headpag.guided.session.session_of(pipe).settings.refresh == 3  # the settings before stay
    headpag.disable(pipe)
