"""Operators dispatched and wall time per denoising step: CFG only, diffusers' PAG pipeline, headpag fused and eager.

The per-call host work of a guided step (binding arguments, selecting rows, building index tensors, checking the
kernel's arguments, gathering (row, head) pairs) does not show in FLOPs, and on a small model it can cost more
than the attention it organises. Two measures make it visible:

- **operators per step**: the aten operators a step dispatches (a proxy for GPU kernel launches), counted with a
  ``TorchDispatchMode`` over a pipeline call of ``s + 1`` steps minus one of ``s`` steps, so the pipeline's per-call
  work (noise, timesteps, decoding) cancels. headpag's ``perturbed_attention`` op counts as one (on CUDA it is one
  Triton launch); ``inner`` counts the operators its torch path runs inside it (what a CPU runs instead);
- **ms per step**: the wall time of a pipeline call divided by its steps (as ``headpag demo`` reports it), the
  median over ``repeats`` rounds in which every variant runs once, interleaved, so load on a shared machine
  reaches all of them alike; and the process's CPU time per step (``time.process_time``), which a busy machine
  disturbs less (waiting for a core is not counted).

Two models (``MODELS``): ``"sd3"``, the SD3-shaped pipeline of the bench's CPU setting (``guided_step.SETTINGS["cpu"]``,
one step per call, CFG on, its contenders including diffusers' ``StableDiffusion3PAGPipeline``), and ``"digits"``,
the embedded digits model as ``headpag demo`` runs it (80 images, the demo's head sets, CFG off on the PAG rows;
diffusers has no PAG pipeline for it). ``compare`` takes code variants too (context managers that patch headpag,
e.g. an old implementation), interleaved with each other in the same rounds.
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import headpag
_op_module = importlib.import_module("headpag.kernels.perturbed_attention")  # the module (the package exports the function)

from . import guided_step


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it (``counts``, by name). headpag's ``perturbed_attention`` op is
    counted once in ``counts`` and the operators of its implementation in ``inner`` (run outside the dispatcher, so
    that the counter sees them)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.inner: Counter[str] = Counter()
        self._inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__) if func.namespace == "aten" else f"{func.namespace}::{func.__name__}"
        (self.inner if self._inside else self.counts)[name] += 1
        if func.namespace == "headpag" and not self._inside:
            self._inside = True
            try:
                with self:
                    return _op_module.perturbed_attention_impl(*args, **kwargs)
            finally:
                self._inside = False
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class OpsPerStep:
    """Operators one denoising step dispatches: ``ops`` (headpag's op counted once), ``inner`` (operators inside
    headpag's op), ``headpag_ops`` (calls of headpag's op) and the ten most frequent operators."""

    ops: int
    inner: int
    headpag_ops: int
    top: tuple[tuple[str, int], ...]


def count_ops_per_step(call: Callable[[int], Any], steps: int = 1) -> OpsPerStep:
    """Operators per step of ``call(n_steps)`` (a pipeline call): the count of ``steps + 1`` steps minus that of
    ``steps`` steps, after one uncounted call (what is built once, such as headpag's call states, is not a step's).
    Raises ``ValueError`` when the difference is negative (the calls are not comparable)."""
    call(steps)
    counters = []
    for n in (steps, steps + 1):
        with OpCounter() as counter:
            call(n)
        counters.append(counter)
    few, many = counters
    diff = many.counts.copy()
    diff.subtract(few.counts)
    inner = many.inner.copy()
    inner.subtract(few.inner)
    ops, inner_ops = sum(diff.values()), sum(inner.values())
    if ops < 0 or inner_ops < 0:
        raise ValueError(f"a call of {steps + 1} steps dispatched fewer operators than one of {steps}: {ops}, {inner_ops}")
    headpag_ops = sum(n for name, n in diff.items() if name.startswith("headpag::"))
    top = tuple((name, n) for name, n in diff.most_common(10) if n > 0)
    return OpsPerStep(ops, inner_ops, headpag_ops, top)


@dataclass(frozen=True)
class Variant:
    """One way of running a step: ``kind`` "plain" (the pipeline as it is), "fused" / "eager" (headpag on ``heads``,
    with ``refresh``) or "diffusers" (diffusers' PAG pipeline); ``guidance_scale`` the CFG scale of the call (None:
    the model's). Operators are counted for ``refresh == 1`` only (with reuse, steps differ)."""

    name: str
    kind: str
    heads: str | None = None
    mode: str = "joint"
    u: float | None = None
    guidance_scale: float | None = None
    refresh: int = 1


@dataclass
class Model:
    """A pipeline to measure: ``call(pipe, steps, guidance_scale)`` runs one call (deterministic noise); ``pag`` is
    diffusers' PAG pipeline on the same components (None where diffusers has none); ``steps`` the steps of a timed
    call; ``pag_scale`` headpag's and diffusers' PAG scale."""

    name: str
    pipe: Any
    pag: Any
    call: Callable[[Any, int, float | None], Any]
    variants: tuple[Variant, ...]
    steps: int
    pag_scale: float


def sd3_model(setting: guided_step.Setting | None = None) -> Model:
    """The bench's SD3-shaped CPU pipeline (``guided_step.SETTINGS["cpu"]`` unless given) and its contenders."""
    pipes = guided_step.build(setting or guided_step.SETTINGS["cpu"], with_ref=False)

    def call(pipe, steps, guidance_scale):
        extra = {} if pipe is not pipes.pag else dict(pag_scale=guided_step.PAG_SCALE)
        inputs = dict(pipes.inputs, num_inference_steps=steps)
        if guidance_scale is not None:
            inputs["guidance_scale"] = guidance_scale
        return pipe(**inputs, **extra, generator=torch.Generator(pipes.setting.device).manual_seed(0)).images

    variants = [Variant(name, spec["kind"], spec.get("heads"), spec.get("mode", "joint"))
                for name, spec in guided_step.CONTENDERS.items()]
    return Model("sd3", pipes.pipe, pipes.pag, call, tuple(variants), steps=1, pag_scale=guided_step.PAG_SCALE)


def digits_model(seeds: int = 8, steps: int = 16) -> Model:
    """The embedded digits pipeline as ``headpag demo`` runs it: ``seeds`` x 10 digits per call, PAG scale 3, CFG off
    on the PAG rows; the demo's head sets (layers 2, 3; heads 1:1,2:0,3:3; SoftPAG u=0.5 on the layers; the heads
    its README run hunted, also with its refresh rows) and its baselines (no guidance; CFG s=2)."""
    from ..demo import REFRESH_ROWS, DemoConfig
    from ..digits import load_pipeline

    cfg = DemoConfig()
    pipe = load_pipeline()
    digits, seed_list = list(range(10)), list(range(seeds))
    prompts = [d for d in digits for _ in seed_list]

    def call(pipe, n_steps, guidance_scale):
        generators = [torch.Generator().manual_seed(10 * s + d) for d in digits for s in seed_list]
        return pipe(prompts, generator=generators, num_inference_steps=n_steps, output_type="pt",
                    guidance_scale=cfg.guidance_scale if guidance_scale is None else guidance_scale).images

    layers = ",".join(f"{int(t)}:*" for t in cfg.layers.split(","))
    hunted = "0:0,2:3,3:3,5:1"
    sets = (("layer-pag", layers, None), ("head-pag", cfg.heads, None), ("softpag", layers, cfg.u),
            ("hunted", hunted, None))
    variants = [Variant("none", "plain"), Variant(f"cfg s={cfg.cfg:g}", "plain", guidance_scale=cfg.cfg)]
    for name, heads, u in sets:
        variants += [Variant(f"fused {name}", "fused", heads, cfg.mode, u), Variant(f"eager {name}", "eager", heads, cfg.mode, u)]
    for k in REFRESH_ROWS:
        variants += [Variant(f"{kind} hunted refresh={k}", kind, hunted, cfg.mode, refresh=k) for kind in ("fused", "eager")]
    return Model("digits", pipe, None, call, tuple(variants), steps=steps, pag_scale=cfg.scale)


MODELS: dict[str, Callable[[], Model]] = {"sd3": sd3_model, "digits": digits_model}


@contextlib.contextmanager
def activated(model: Model, variant: Variant):
    """Patches ``model``'s pipeline for ``variant`` and yields ``step(n_steps)``; unpatches afterwards."""
    if variant.kind == "diffusers":
        if model.pag is None:
            raise ValueError(f"variant {variant.name}: diffusers has no PAG pipeline for the {model.name} model")
        yield lambda n: model.call(model.pag, n, variant.guidance_scale)
        return
    if variant.kind not in ("plain", "fused", "eager"):
        raise ValueError(f"variant {variant.name}: kind must be one of plain, fused, eager, diffusers; got {variant.kind!r}")
    if variant.kind != "plain":
        enable = headpag.enable_fused if variant.kind == "fused" else headpag.enable_eager
        enable(model.pipe, variant.heads, scale=model.pag_scale, mode=variant.mode, u=variant.u, refresh=variant.refresh)
    try:
        yield lambda n: model.call(model.pipe, n, variant.guidance_scale)
    finally:
        headpag.disable(model.pipe)


def compare(model: Model | str, variants: Sequence[str] | None = None, repeats: int = 5,
            code: Mapping[str, Callable[[], ContextManager]] | None = None, threads: int | None = None,
            count: bool = True) -> list[dict]:
    """Operators per step and ms per step of each variant of ``model`` (all of them unless ``variants`` names some),
    under each entry of ``code`` (name -> context manager factory patching headpag; default: the code as it is).

    Every round runs each (code, variant) once, in a fixed interleaved order, after one untimed warm-up round;
    ``ms_per_step`` is the median over ``repeats`` rounds (min and max given too). Returns one dict per (code,
    variant). ``threads``: torch threads for the run (None: leave the setting).
    """
    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(f"model must be a Model or one of {', '.join(MODELS)}; got {model!r}")
        model = MODELS[model]()
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    chosen = [v for v in model.variants if variants is None or v.name in variants]
    if variants is not None and len(chosen) != len(set(variants)):
        known = ", ".join(v.name for v in model.variants)
        raise ValueError(f"variants must be among {known}; got {list(variants)}")
    chosen = [v for v in chosen if v.kind != "diffusers" or model.pag is not None]
    code = dict(code or {"current": contextlib.nullcontext})
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        results = {(c, v.name): dict(model=model.name, code=c, variant=v.name, kind=v.kind, heads=v.heads or "-",
                                     mode=v.mode, u=v.u, steps_per_call=model.steps, times=[], cpu_times=[])
                   for c in code for v in chosen}
        with torch.no_grad():
            for round_ in range(repeats + 1):
                for c, patch in code.items():
                    with patch():
                        for v in chosen:
                            with activated(model, v) as step:
                                start, cpu_start = time.perf_counter(), time.process_time()
                                step(model.steps)
                                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
                                if round_ == 0 and count and v.refresh == 1:
                                    per_step = count_ops_per_step(step)
                                    results[(c, v.name)].update(ops_per_step=per_step.ops, inner_ops_per_step=per_step.inner,
                                                                headpag_ops_per_step=per_step.headpag_ops)
                            if round_ > 0:
                                results[(c, v.name)]["times"].append(1e3 * seconds / model.steps)
                                results[(c, v.name)]["cpu_times"].append(1e3 * cpu_seconds / model.steps)
    finally:
        torch.set_num_threads(old_threads)
    for r in results.values():
        times, cpu_times = r.pop("times"), r.pop("cpu_times")
        r.update(ms_per_step=statistics.median(times), min_ms=min(times), max_ms=max(times), repeats=len(times),
                 cpu_ms_per_step=statistics.median(cpu_times))
    return list(results.values())


def table(rows: list[dict]) -> str:
    """A Markdown table of :func:`compare`'s rows."""
    lines = ["| model | code | variant | heads (mode) | ops/step | inside headpag's op | ms/step (median) | min-max ms | "
             "CPU ms/step (median) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        soft = "" if r["u"] is None else f" u={r['u']:g}"
        heads = r["heads"] if r["heads"] == "-" else f"{r['heads']}{soft} ({r['mode']})"
        ops = r.get("ops_per_step", "")
        inner = r.get("inner_ops_per_step", "")
        lines.append(f"| {r['model']} | {r['code']} | {r['variant']} | {heads} | {ops} | {inner} | {r['ms_per_step']:.1f} | "
                     f"{r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['cpu_ms_per_step']:.1f} |")
    return "\n".join(lines)
