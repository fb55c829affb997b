"""``headpag demo``: head-level PAG on the embedded digits model, end to end on a CPU in a few minutes.

Loads :class:`headpag.apps.digits.DigitsPipeline` (the shipped weights) and the digit classifier, then generates the same
images (every digit 0-9 x ``seeds`` seeds, the same initial noise in every setting) with:

- ``none``: no guidance at all (CFG off, no PAG) - the baseline;
- ``cfg``: classifier-free guidance only (reference, ``--cfg``);
- ``layer-pag``: PAG on every head of one or two layers (``--layers``);
- ``head-pag``: PAG on a hand-picked head-level HeadSet (``--heads``);
- ``softpag``: the layer set with ``u < 1`` (``--u``);
- ``hunted``: the heads a short HeadHunter run picked (``--hunt-rounds`` x ``--hunt-k``), searched on other seeds
  than the ones evaluated here, with the classifier's confidence in the asked digit as objective (each round's
  candidates are scored with the heads selected so far, CFG off, PAG scale ``--scale``);
- ``hunted refresh=k`` (k in ``REFRESH_ROWS``): the hunted heads with ``refresh=k``: the perturbed rows run on every
  k-th step and their difference is reused in between; the table adds the relative L2 distance of these samples to
  the ``hunted`` row's (every step). These rows are in the table and the JSON, not in the figure.

PAG settings run CFG off (``--guidance-scale``, default 1), as in the HeadHunter paper's searches. For each
setting it reports the objective (mean classifier confidence of the asked digit), the fraction of images the
classifier recognises as the asked digit, and for PAG settings the time per denoising step of
``headpag.enable_fused`` and of ``headpag.enable_eager`` (and the largest pixel difference between the two, a
correctness check). Writes ``headpag-demo.png`` and ``headpag-demo.json`` into ``--out``. The PNG explains itself:
a title with the model, steps, scale and mode; a band of samples per setting labelled with its heads and score;
a cell per digit with its seeds (every seed of the table up to ``FIGURE_SEEDS``, else a note of which are shown)
under a digit / seed header.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..kernels import MODES

REFRESH_ROWS = (2, 3, 4)  # refresh=k rows of the hunted heads
FIGURE_SEEDS = 8  # at most this many seeds per digit are drawn in the PNG (the title says when fewer than the table)


@dataclass
class DemoConfig:
    seeds: int = 8  # images per digit
    steps: int = 16  # inference steps
    scale: float = 3.0  # PAG scale w
    u: float = 0.5  # SoftPAG coefficient
    layers: str = "2,3"  # layer-level PAG: every head of these layers
    heads: str = "1:1,2:0,3:3"  # head-level HeadSet
    mode: str = "joint"
    guidance_scale: float = 1.0  # CFG scale of the PAG settings (1 = off)
    cfg: float = 2.0  # CFG scale of the reference row
    hunt_rounds: int = 2
    hunt_k: int = 2
    hunt_seeds: int = 2  # seeds per digit in the search (different from the evaluated seeds)
    timing_repeats: int = 5  # rounds of eager and fused, alternating; the best of each is reported
    out: str = "."
    threads: int | None = 1  # torch threads (None: leave torch's setting); 1 is fastest for this tiny model

    def check(self) -> None:
        """Raises ``ValueError`` naming the setting (as its ``headpag demo`` option) for anything unusable that needs
        no model: numbers out of range, head or layer strings that do not parse, an output directory that cannot be
        written. :func:`run_demo` calls it first, and checks the heads and layers against the model before sampling."""
        from .cli import check_output_dir

        def number(name, ok, expected):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {value!r}")

        for name in ("seeds", "steps", "hunt_rounds", "hunt_k", "hunt_seeds", "timing_repeats"):
            number(name, lambda x: x >= 1 and int(x) == x, "an int >= 1")
        number("scale", lambda x: x >= 0, "a finite number >= 0")
        number("u", lambda x: 0 < x < 1, "a number in (0, 1)")
        number("guidance_scale", lambda x: True, "a finite number")
        number("cfg", lambda x: True, "a finite number")
        if self.threads is not None:
            number("threads", lambda x: x >= 0 and int(x) == x, "an int >= 0")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        self.head_sets()
        check_output_dir(self.out, "--out")

    def head_sets(self, model=None):
        """``(layer set, head set)``: every head of ``layers``, and ``heads``; checked against ``model`` when given.
        A ``ValueError`` names the option."""
        from ..heads import HeadSet

        tokens = [t.strip() for t in str(self.layers).split(",") if t.strip()]
        if not all(t.isdigit() for t in tokens):
            raise ValueError(f"--layers must be comma-separated layer indices such as '2,3', got {self.layers!r}")
        sets = []
        for option, text in (("--layers", ",".join(f"{int(t)}:*" for t in tokens)), ("--heads", self.heads)):
            try:
                hs = HeadSet(text)
                if model is not None:
                    hs.resolve(model)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{option}: {err}") from None
            if not hs:
                raise ValueError(f"{option} selects no head")
            sets.append(hs)
        return tuple(sets)

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        base = dict(seeds=2, steps=8, hunt_rounds=1, hunt_k=1, hunt_seeds=1, timing_repeats=1)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass
class Row:
    name: str
    description: str
    heads: str
    score: float
    recognised: float
    fused_ms: float | None = None
    eager_ms: float | None = None
    max_diff: float | None = None
    relative_l2: float | None = None  # refresh rows: ||x - x_every_step|| / ||x_every_step|| over all samples
    images: torch.Tensor | None = field(default=None, repr=False)


def _generators(digits, seeds):
    return [torch.Generator().manual_seed(10 * s + d) for d in digits for s in seeds]


def _generate(pipe, digits, seeds, steps, guidance_scale):
    """Images of every digit x seed (digit-major), and the seconds the call took."""
    prompts = [d for d in digits for _ in seeds]
    start = time.perf_counter()
    images = pipe(prompts, generator=_generators(digits, seeds), num_inference_steps=steps,
                  guidance_scale=guidance_scale, output_type="pt").images
    return images, time.perf_counter() - start


def _timed(pipe, digits, seeds, cfg: DemoConfig, repeats: int):
    """Best-of-``repeats`` generation (the images are the same every time)."""
    best, images = float("inf"), None
    for _ in range(max(1, repeats)):
        images, seconds = _generate(pipe, digits, seeds, cfg.steps, cfg.guidance_scale)
        best = min(best, seconds)
    return images, best


def format_table(rows: list[Row]) -> str:
    head = ("| setting | heads | score | recognised | fused ms/step | eager ms/step | eager/fused | max abs(fused - eager) "
            "| rel. L2 to every step |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        ms = lambda x: "" if x is None else f"{x:.1f}"
        ratio = "" if r.fused_ms is None else f"{r.eager_ms / r.fused_ms:.2f}x"
        diff = "" if r.max_diff is None else f"{r.max_diff:.1e}"
        l2 = "" if r.relative_l2 is None else f"{r.relative_l2:.4f}"
        lines.append(f"| {r.name} | {r.heads} | {r.score:.3f} | {r.recognised:.0%} | {ms(r.fused_ms)} | "
                     f"{ms(r.eager_ms)} | {ratio} | {diff} | {l2} |")
    return "\n".join(lines)


def row_labels(row: Row) -> list[str]:
    """The figure's label of a row: its setting, what it perturbs, its score."""
    what = {"none": "no CFG, no PAG"}.get(row.name, row.description if row.heads == "-" else f"heads {row.heads}")
    name = f"hunted by {row.description}" if row.name == "hunted" else row.name
    return [name, what, f"score {row.score:.3f}, {row.recognised:.0%} recognised"]


def save_figure(rows: list[Row], cfg: DemoConfig, pipe, path: Path) -> str:
    """``headpag-demo.png``: title, digit / seed header, one labelled band of samples per row (see the module
    docstring)."""
    from .digits.grid import save_table_figure

    shown = min(cfg.seeds, FIGURE_SEEDS)
    keep = [i for i in range(10 * cfg.seeds) if i % cfg.seeds < shown]
    config = pipe.transformer.config
    title = [
        f"headpag demo: perturbed-attention guidance (PAG) per head on the embedded digits model "
        f"({type(pipe.transformer).__name__}, {config.num_layers} layers x {config.num_attention_heads} heads)",
        f"{cfg.steps} steps; PAG scale w={cfg.scale:g}, mode {cfg.mode}, CFG scale {cfg.guidance_scale:g} on the PAG "
        f"rows; every row starts from the same noise per digit and seed",
        f"score: mean classifier confidence in the asked digit over {10 * cfg.seeds} images (10 digits x "
        f"{cfg.seeds} seeds); heads as layer:head (@u: SoftPAG coefficient u)",
    ]
    if shown < cfg.seeds:
        title.append(f"shown: seeds 0-{shown - 1} of the table's 0-{cfg.seeds - 1}")
    return save_table_figure([r.images[keep] for r in rows], path, labels=[row_labels(r) for r in rows],
                             digits=range(10), seeds=range(shown), title=title)


def run_demo(config: DemoConfig | None = None, *, log=print) -> dict:
    """Runs the demo (module docstring); returns the results (also written to ``out/headpag-demo.json``)."""
    cfg = config or DemoConfig()
    cfg.check()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig, log) -> dict:
    from .. import disable, enable_eager, enable_fused, hunt
    from .digits import DigitObjective, load_pipeline

    out = Path(cfg.out)
    t0 = time.perf_counter()
    pipe = load_pipeline()
    layer_heads, head_set = cfg.head_sets(pipe)  # checked against the model before anything is sampled
    out.mkdir(parents=True, exist_ok=True)
    objective = DigitObjective()
    digits = list(range(10))
    seeds = list(range(cfg.seeds))
    prompts = [str(d) for d in digits for _ in seeds]
    target = torch.tensor([d for d in digits for _ in seeds])

    def measure(name, description, heads_text, images, **extra) -> Row:
        scores = objective(images, prompts)
        recognised = (objective.predict(images) == target).float().mean().item()
        return Row(name, description, heads_text, scores.mean().item(), recognised, images=images, **extra)

    settings = [
        ("layer-pag", f"PAG on every head of layer(s) {cfg.layers}", layer_heads, None),
        ("head-pag", "PAG on a head-level HeadSet", head_set, None),
        ("softpag", f"SoftPAG: the layer set with u={cfg.u}", layer_heads, cfg.u),
    ]
    rows: list[Row] = []
    # Warm-up (first-call overheads), then the unguided baselines.
    _generate(pipe, [0], [0], 2, 1.0)
    images, seconds = _timed(pipe, digits, seeds, cfg, cfg.timing_repeats)
    rows.append(measure("none", "no guidance (CFG off, no PAG)", "-", images, fused_ms=None))
    plain_ms = 1000 * seconds / cfg.steps
    images, _ = _generate(pipe, digits, seeds, cfg.steps, cfg.cfg)
    rows.append(measure(f"cfg s={cfg.cfg:g}", "classifier-free guidance only (reference)", "-", images))

    def pag_row(name, description, heads, u, refresh=1) -> Row:
        # Best of timing_repeats rounds of both, each round in the other order than the last, so that other load on
        # the machine and whatever the previous run left behind reach both alike.
        seconds, images = {}, {}
        order = [("eager", enable_eager), ("fused", enable_fused)]
        for _ in range(cfg.timing_repeats):
            for execution, enable in order:
                enable(pipe, heads, scale=cfg.scale, u=u, mode=cfg.mode, refresh=refresh)
                images[execution], run_seconds = _generate(pipe, digits, seeds, cfg.steps, cfg.guidance_scale)
                seconds[execution] = min(seconds.get(execution, float("inf")), run_seconds)
            order.reverse()
        disable(pipe)
        text = str(heads.with_u(u) if u is not None else heads)
        return measure(name, description, text, images["fused"], fused_ms=1000 * seconds["fused"] / cfg.steps,
                       eager_ms=1000 * seconds["eager"] / cfg.steps,
                       max_diff=(images["fused"] - images["eager"]).abs().max().item())

    for name, description, heads, u in settings:
        rows.append(pag_row(name, description, heads, u))
        log(f"  {name}: done ({time.perf_counter() - t0:.0f} s)")

    hunt_start = time.perf_counter()
    result = hunt(
        pipe, objective, [str(d) for d in digits], seeds=[1000 + s for s in range(cfg.hunt_seeds)], k=cfg.hunt_k,
        rounds=cfg.hunt_rounds, scale=cfg.scale, mode=cfg.mode, guidance_scale=cfg.guidance_scale,
        num_inference_steps=cfg.steps, batch_size=40, verbose=False,
    )
    hunt_seconds = time.perf_counter() - hunt_start
    rounds = []
    for r in result.rounds:
        ranked = sorted(r.means.items(), key=lambda kv: -kv[1])
        rounds.append({"round": r.round, "added": [f"{l}:{h}" for l, h in r.added],
                       "best": [[f"{l}:{h}", m] for (l, h), m in ranked[:5]],
                       "worst": [[f"{l}:{h}", m] for (l, h), m in ranked[-3:]]})
    log(f"  hunt: {result.images_generated} images in {hunt_seconds:.0f} s, selected {result.heads}")
    rows.append(pag_row("hunted", f"HeadHunter ({cfg.hunt_rounds} round(s), k={cfg.hunt_k})", result.heads, None))
    every_step = rows[-1].images
    figure_rows = list(rows)
    for k in REFRESH_ROWS:
        row = pag_row(f"hunted refresh={k}", f"the hunted heads, perturbed rows every {k}-th step", result.heads,
                      None, refresh=k)
        row.relative_l2 = float((row.images - every_step).flatten().norm() / every_step.flatten().norm())
        rows.append(row)
    log(f"  refresh rows: done ({time.perf_counter() - t0:.0f} s)")

    grid = save_figure(figure_rows, cfg, pipe, out / "headpag-demo.png")
    table = format_table(rows)
    summary = {
        "config": asdict(cfg),
        "baseline_ms_per_step": plain_ms,
        "rows": [{k: v for k, v in asdict(r).items() if k != "images"} for r in rows],
        "hunt": {"heads": str(result.heads), "images_generated": result.images_generated, "seconds": hunt_seconds,
                 "rounds": rounds},
        "seconds": time.perf_counter() - t0,
        "grid": str(grid),
        "table": table,
    }
    (out / "headpag-demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(args) -> int:
    """Entry point of ``headpag demo`` (``args`` from the CLI parser)."""
    overrides = dict(seeds=args.seeds, steps=args.steps, scale=args.scale, u=args.u, layers=args.layers,
                     heads=args.heads, mode=args.mode, guidance_scale=args.guidance_scale, cfg=args.cfg,
                     hunt_rounds=args.hunt_rounds, hunt_k=args.hunt_k, hunt_seeds=args.hunt_seeds, out=args.out,
                     threads=args.threads)
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(
        **{k: v for k, v in overrides.items() if v is not None})
    cfg.check()  # before the banner: a refused setting prints nothing else
    print(f"headpag demo: digits model, {cfg.seeds} seed(s) x 10 digits, {cfg.steps} steps, PAG scale {cfg.scale}, "
          f"mode {cfg.mode}, CFG {cfg.guidance_scale:g} on PAG rows", flush=True)
    summary = run_demo(cfg, log=lambda m: print(m, flush=True))
    print()
    print(summary["table"])
    print()
    print("score: mean classifier confidence in the asked digit (the hunt's objective); recognised: fraction the "
          "classifier labels as the asked digit;")
    print(f"ms/step: one denoising step of the whole batch ({10 * cfg.seeds} images; without PAG "
          f"{summary['baseline_ms_per_step']:.1f} ms/step).")
    hunt_ = summary["hunt"]
    print(f"hunted heads: {hunt_['heads']} ({hunt_['images_generated']} images searched on other seeds, "
          f"{hunt_['seconds']:.0f} s)")
    for r in hunt_["rounds"]:
        fmt = lambda pairs: ", ".join(f"{h} {m:.3f}" for h, m in pairs)
        print(f"  round {r['round']}: added {', '.join(r['added'])}; best {fmt(r['best'][:3])}; worst {fmt(r['worst'])}")
    print(f"wrote {summary['grid']} and {Path(cfg.out) / 'headpag-demo.json'} ({summary['seconds']:.0f} s in all)")
    return 0
