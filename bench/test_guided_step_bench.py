"""pytest-benchmark suite of one guided denoiser step: the settings and contenders of
``headpag.apps.benchmarks.guided_step`` (what ``headpag bench`` runs), timed by pytest-benchmark.

    python -m pytest bench/test_guided_step_bench.py --benchmark-only --benchmark-json=bench/results/guided-step-cpu.json
    python bench/summarize.py bench/results/guided-step-cpu.json

The ``cpu`` setting always runs; the CUDA settings skip themselves without a GPU. Per setting, before anything is
timed, every contender's output is computed and checked (fused == eager == diffusers PAG where they must agree,
guided != CFG only), FLOPs are counted on the meta device and peak memory is measured. Each timed round follows an
untimed CFG-only step on an identical copy of the pipeline (pytest-benchmark's ``setup``), timed on the side for the
paired ratio. ``extra_info`` holds the same record as ``headpag bench`` plus the setting.
"""

from __future__ import annotations

import pytest

from headpag.apps.benchmarks import guided_step, roofline

PARAMS = [(setting, name) for setting in guided_step.SETTINGS for name in guided_step.CONTENDERS]


@pytest.fixture(scope="module")
def prepared() -> dict:
    """Per setting, built on first use: pipelines, checked outputs' diffs, FLOPs, peak memory."""
    return {}




@pytest.mark.parametrize("setting_name,name", PARAMS, ids=[f"{s}-{n}" for s, n in PARAMS])
def test_guided_step(benchmark, prepared, setting_name, name):
    setting = guided_step.SETTINGS[setting_name]
    if (why := guided_step.available(setting)) is not None:
        pytest.skip(why)
    if setting_name not in prepared:
        prepared[setting_name] = guided_step.prepare(setting)
    state = prepared[setting_name]
    pipes = state.pipes
    benchmark.group = f"guided step {setting_name}"
    info = benchmark.extra_info
    info.update(setting=setting_name, label=setting.label, model=setting.model, dtype=str(setting.dtype).removeprefix("torch."),
                image_tokens=setting.image_tokens, text_tokens=setting.text, guidance_scale=guided_step.GUIDANCE,
                pag_scale=guided_step.PAG_SCALE, max_abs_diffs=state.diffs, parameters=state.parameters)
    setup, paired = guided_step.paired_reference(pipes)  # an unpatched CFG step before every round, timed on the side
    with guided_step.activated(name, pipes) as step:
        benchmark.pedantic(step, setup=setup, rounds=setting.rounds, warmup_rounds=setting.warmup, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    times = list(benchmark.stats.stats.data)
    info.update(guided_step.record(name, times, paired[-len(times):], state.flops), **state.memory[name])
    if setting.project_roofline and name in state.flops:
        info["roofline_h100_projection"] = roofline.project(state.flops[name], state.parameters)
