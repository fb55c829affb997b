"""What ``refresh = k`` (reuse of ``cond - perturbed`` between refresh steps) costs and changes, per sampling run.

- :func:`run_flops`: FLOPs of a whole sampling run (28 steps) at full size, from per-step counts on the meta device
  (``meta_flops.count_variant``: the CFG-only step and the fused guided step, paper-like heads). A run is
  ``refresh_steps * fused_step + (28 - refresh_steps) * cfg_step``: a step that reuses the difference runs exactly the
  CFG-only batch (``tests/guided/test_refresh.py`` checks that no twin row runs there) plus an elementwise fold that
  ``FlopCounterMode`` does not count (it counts matrix products). Guided steps are those of the interval
  (``start <= i / 28 < stop``); refresh steps are the first guided step and every ``k``-th after it. Intervals:
  the whole run, and ``(0.01, 0.2)`` (diffusers' ``PerturbedAttentionGuidance`` default).
- :func:`cpu_run_times`: wall clock of whole sampling runs on the bench's SD3-shaped CPU model (``guided_step``):
  CFG only, diffusers' ``StableDiffusion3PAGPipeline`` on blocks 4 and 6, headpag fused on the same layers
  (``mode="image"``, diffusers' semantics) with refresh 1, 2 and 4; rounds interleaved, medians.
- :func:`digits_quality`: the embedded digits model with given heads: the digit objective and the recognised
  fraction for refresh 1-4 over the demo's digits and seeds, and the relative L2 distance of each final sample to
  refresh 1's.
"""

from __future__ import annotations

import statistics
import time

import torch

import headpag

from . import full_size, meta_flops

REFRESH = (1, 2, 3, 4)
INTERVALS = {"whole run": (0.0, 1.0), "diffusers default (0.01, 0.2)": (0.01, 0.2)}
# (model name in full_size.models(), case): CFG on where the model has it, FLUX.1-dev's distilled guidance.
RUN_MODELS = {"SD3-medium": "cfg_on", "FLUX.1-dev": "distilled", "FLUX.2-dev": "distilled",
              "Qwen-Image": "true_cfg", "Wan2.1-T2V-14B": "cfg_on", "SD1.5": "cfg_on", "SDXL": "cfg_on"}
QUICK_MODELS = ("SD3-medium",)
# The digits rows' heads: what ``headpag demo``'s HeadHunter run picked (README, "The demo: what it measured"); the
# demo itself measures the same rows with the heads its own hunt picks.
DIGITS_HEADS = "0:0,2:3,3:3,5:1"
DIGITS_STEPS, DIGITS_SEEDS, DIGITS_SCALE = 16, 8, 3.0


def guided_steps(steps: int, interval: tuple[float, float]) -> list[int]:
    """The steps ``i`` of ``steps`` with ``start <= i / steps < stop`` (``Settings.interval``)."""
    start, stop = interval
    return [i for i in range(steps) if start <= i / steps < stop]


def refresh_steps(steps: int, interval: tuple[float, float], refresh: int) -> list[int]:
    """The guided steps that run the perturbed rows: the first, then every ``refresh``-th."""
    guided = guided_steps(steps, interval)
    return [i for i in guided if (i - guided[0]) % refresh == 0] if guided else []


def schedule_ratio(step_ratio: float, steps: int, interval: tuple[float, float], refresh: int) -> float:
    """FLOPs of a run over the CFG-only run, when a refreshing step costs ``step_ratio`` CFG-only steps and every
    other step one."""
    n = len(refresh_steps(steps, interval, refresh))
    return (n * step_ratio + (steps - n)) / steps


def run_flops(quick: bool = False) -> dict:
    """Per model: the per-step counts and the run ratio to CFG only for every interval and refresh (keyed by
    ``str(k)``, as in the JSON)."""
    start = time.perf_counter()
    results = []
    for name, make_pipe, model_call, attr, cases, resolution, _ in full_size.models():
        if name not in RUN_MODELS or (quick and name not in QUICK_MODELS):
            continue
        case = cases[RUN_MODELS[name]]
        pipe = make_pipe()
        if case.get("guidance") is not None:
            pipe._guidance_scale = case["guidance"]
        heads = full_size._expand(full_size.HEAD_SETS[name]["paper-like"], headpag.list_layers(pipe))
        call, n_base = case.get("call", model_call), case["n_base"]
        cfg, _ = meta_flops.count_variant(pipe, call, n_base, dict(kind="plain"))
        fused, _ = meta_flops.count_variant(pipe, call, n_base, dict(kind="fused", heads=heads))
        ratios = {label: {str(k): schedule_ratio(fused / cfg, meta_flops.STEPS, interval, k) for k in REFRESH}
                  for label, interval in INTERVALS.items()}
        results.append(dict(model=name, resolution=resolution, case=RUN_MODELS[name], heads=heads,
                            n_heads=len(heads.split(",")), step_flops=dict(cfg_only=cfg, fused=fused),
                            step_ratio=fused / cfg, run_ratio=ratios))
    return dict(steps=meta_flops.STEPS, intervals=INTERVALS, refresh=list(REFRESH), results=results,
                guided_steps={label: guided_steps(meta_flops.STEPS, iv) for label, iv in INTERVALS.items()},
                seconds=time.perf_counter() - start)


def cpu_run_times(steps: int = 8, rounds: int = 3, refresh=(1, 2, 4), setting=None) -> dict:
    """Median seconds of one ``steps``-step sampling run per contender on the CPU SD3-shaped bench model
    (``setting``: a ``guided_step.Setting``, default the ``cpu`` one), measured in interleaved rounds (one run of
    every contender per round), and each median over CFG only's."""
    from . import guided_step

    setting = setting or guided_step.SETTINGS["cpu"]
    pipes = guided_step.build(setting, with_ref=False)
    inputs = dict(pipes.inputs, num_inference_steps=steps)

    def call(pipe, **extra):
        return pipe(**inputs, **extra, generator=torch.Generator().manual_seed(0)).images

    contenders = {"cfg only": lambda: call(pipes.pipe),
                  "diffusers PAG (blocks 4, 6)": lambda: call(pipes.pag, pag_scale=guided_step.PAG_SCALE)}
    for k in refresh:
        contenders[f"fused refresh={k}"] = (k,)

    def run(name):
        spec = contenders[name]
        if callable(spec):
            return spec()
        headpag.enable_fused(pipes.pipe, guided_step.LAYER_HEADS, scale=guided_step.PAG_SCALE, mode="image",
                             refresh=spec[0])
        try:
            return call(pipes.pipe)
        finally:
            headpag.disable(pipes.pipe)

    times = {name: [] for name in contenders}
    with torch.inference_mode():
        for name in contenders:  # warm-up
            run(name)
        for _ in range(rounds):
            for name in contenders:
                t0 = time.perf_counter()
                run(name)
                times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["cfg only"]
    return dict(model=f"SD3-shaped CPU bench model (guided_step.SMALL_SD3), {(setting.latent // 2) ** 2} image + "
                      f"{setting.text} text tokens", steps=steps,
                rounds=rounds, threads=torch.get_num_threads(), seconds=medians,
                ratio_to_cfg={name: m / base for name, m in medians.items()}, all_seconds=times)


def digits_quality(pipe, objective, heads, *, digits, seeds, steps: int, scale: float, mode: str = "joint",
                   guidance_scale: float = 1.0, refresh=REFRESH) -> list[dict]:
    """For each ``refresh``: mean objective score, recognised fraction, and the relative L2 distance of the final
    samples to refresh 1's (``||x_k - x_1|| / ||x_1||`` over all images), ``heads`` fused at ``scale``."""
    prompts = [d for d in digits for _ in seeds]
    target = torch.tensor(prompts)
    rows, first = [], None
    for k in refresh:
        headpag.enable_fused(pipe, heads, scale=scale, mode=mode, refresh=k)
        try:
            generators = [torch.Generator().manual_seed(10 * s + d) for d in digits for s in seeds]
            images = pipe(prompts, generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale,
                          output_type="pt").images
        finally:
            headpag.disable(pipe)
        if first is None:
            first = images
        distance = float((images - first).flatten().norm() / first.flatten().norm().clamp_min(1e-12))
        rows.append(dict(refresh=k, score=objective(images, [str(p) for p in prompts]).mean().item(),
                         recognised=(objective.predict(images) == target).float().mean().item(),
                         relative_l2_to_refresh_1=distance,
                         perturbed_steps=len(refresh_steps(steps, (0.0, 1.0), k))))
    return rows


def section(quick: bool = False, cpu_setting=None) -> dict:
    """``headpag bench``'s ``refresh`` section: run FLOPs (``quick``: SD3-medium only), CPU run times (``quick``: on
    ``cpu_setting``, 4 steps, 1 round) and the digits rows."""
    from ..digits import DigitObjective, load_pipeline

    flops = run_flops(quick=quick)
    times = cpu_run_times(steps=4, rounds=1, setting=cpu_setting) if quick else cpu_run_times()
    pipe = load_pipeline()
    quality = digits_quality(pipe, DigitObjective(), DIGITS_HEADS, digits=list(range(10)),
                             seeds=list(range(2 if quick else DIGITS_SEEDS)), steps=DIGITS_STEPS, scale=DIGITS_SCALE)
    return dict(flops=flops, cpu=times, digits=dict(heads=DIGITS_HEADS, steps=DIGITS_STEPS, scale=DIGITS_SCALE,
                                                      rows=quality))


def format_cpu_run_times(result: dict) -> str:
    lines = [f"{result['model']}, {result['steps']} steps per run, median of {result['rounds']} interleaved round(s), "
             f"{result['threads']} torch threads:", "", "| contender | s per run | / CFG only |", "|---|---:|---:|"]
    for name, seconds in result["seconds"].items():
        lines.append(f"| {name} | {seconds:.2f} | {result['ratio_to_cfg'][name]:.2f}x |")
    return "\n".join(lines)


def markdown(section_result: dict) -> list[str]:
    """The section's Markdown lines for ``report.md``."""
    flops, digits = section_result["flops"], section_result["digits"]
    return ["## Reusing the guidance difference (refresh=k)", "",
            f"FLOPs of a {flops['steps']}-step run over the CFG-only run (meta device, per-step counts combined over "
            f"the schedule; guided steps: whole run, or {flops['guided_steps']['diffusers default (0.01, 0.2)']}):", "",
            format_run_flops(flops), "", format_cpu_run_times(section_result["cpu"]), "",
            f"Digits model, heads {digits['heads']}, {digits['steps']} steps, w={digits['scale']:g}, CFG off:", "",
            format_digits_quality(digits["rows"])]


def format_run_flops(result: dict) -> str:
    """A markdown table: model, per-step ratio, and the run ratio to CFG only per interval and refresh."""
    head = "| model (case) | heads | guided step / CFG step | " + " | ".join(
        f"{label}: refresh {k}" for label in result["intervals"] for k in result["refresh"]) + " |"
    lines = [head, "|" + "---|" * (3 + len(result["intervals"]) * len(result["refresh"]))]
    for r in result["results"]:
        cells = [f"{r['run_ratio'][label][str(k)]:.3f}x" for label in result["intervals"] for k in result["refresh"]]
        lines.append(f"| {r['model']} ({r['case']}) | {r['n_heads']} | {r['step_ratio']:.3f}x | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def format_digits_quality(rows: list[dict]) -> str:
    lines = ["| refresh | perturbed steps | digit score | recognised | rel. L2 to refresh 1 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['refresh']} | {r['perturbed_steps']} | {r['score']:.4f} | {r['recognised']:.3f} | "
                     f"{r['relative_l2_to_refresh_1']:.4f} |")
    return "\n".join(lines)

