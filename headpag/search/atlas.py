"""Pictures of a HeadHunter run directory: an atlas of every head's image and per-round score heatmaps.

It reads the run directory through :mod:`headpag.search.run_dir`, which owns the format: the settings (heads per
layer), every round's records, the round-1 thumbnails and the final selection.

Public API: :func:`score_grid`, :func:`regenerate` (each head's most changed image, with the run's model),
:func:`head_atlas`, :func:`score_heatmap`, :func:`make_atlas` (what ``headpag atlas RUN_DIR`` calls). Drawing needs
matplotlib (``pip install 'headpag[plots]'``); it is imported lazily and drawn on a standalone Agg figure (no
pyplot, no global state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .run_dir import Head, chosen_in_round, parse_head, parse_heads, read_records, read_settings, thumbnail_path

__all__ = ["score_grid", "regenerate", "head_atlas", "score_heatmap", "make_atlas"]


def score_grid(run_dir: str | os.PathLike, round: int = 1):
    """Round ``round``'s candidate mean scores as a ``(layers, max heads)`` float array (NaN where a head was not
    evaluated in that round or does not exist), plus the set of ``(layer, head)`` selected *before* the round and
    the set chosen *in* it (None if that cannot be told). A head evaluated more than once gets the average mean."""
    import numpy as np

    run_dir = Path(run_dir)
    hpl = read_settings(run_dir)["heads_per_layer"]
    records = read_records(run_dir)
    this = [r for r in records if r.get("round") == round]
    if not this:
        rounds = sorted({r.get("round") for r in records}, key=str)
        raise ValueError(f"{run_dir}: no records for round {round} (rounds with records: {rounds or 'none'})")
    sums: dict[Head, list[float]] = {}
    for rec in this:
        head = parse_head(rec["candidate"])
        if head is None or head[0] >= len(hpl) or head[1] >= hpl[head[0]]:
            raise ValueError(f"{run_dir}: candidate {rec['candidate']!r} is not a head of this model ({hpl})")
        mean = rec["mean"]
        sums.setdefault(head, []).append(float("nan") if mean is None else float(mean))
    grid = np.full((len(hpl), max(hpl, default=0)), np.nan)
    for (layer, head), means in sums.items():
        grid[layer, head] = sum(means) / len(means)
    selected = parse_heads(this[0].get("selected"))
    return grid, selected, chosen_in_round(run_dir, records, round)


# --------------------------------------------------------------------------------------------------- drawing


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "headpag's atlas pictures need matplotlib: pip install 'headpag[plots]'"
        ) from e
    return Figure


def _load_thumb(path: Path):
    """The thumbnail as an RGB uint8 array, or None if missing or unreadable."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError):
        return None


ROUND_COLOURS = ("tab:orange", "tab:purple", "tab:cyan", "tab:pink", "tab:olive", "tab:brown")


def _round_picks(run_dir: Path, records: list[dict]) -> dict[int, set[Head]]:
    """``{round: heads chosen in it}`` for every round whose choice can be told."""
    rounds = sorted({r["round"] for r in records if isinstance(r.get("round"), int)})
    picks = {rnd: chosen_in_round(run_dir, records, rnd) for rnd in rounds}
    return {rnd: heads for rnd, heads in picks.items() if heads}


def _pair_scores(records: list[dict], round: int) -> dict[Head, tuple[float, dict[int, float]]]:
    """``{head: (mean, {pair: score})}`` of round ``round``'s records."""
    out: dict[Head, tuple[float, dict[int, float]]] = {}
    for rec in records:
        head = parse_head(rec.get("candidate"))
        if rec.get("round") != round or head is None:
            continue
        pairs = dict(out.get(head, (0.0, {}))[1])
        pairs.update(zip(rec.get("pairs", []), rec.get("scores", [])))
        scores = [float(v) for v in pairs.values()]
        out[head] = (sum(scores) / len(scores) if scores else float("nan"), pairs)
    return out


ALL_PAIRS_UP_TO = 12  # runs with at most this many prompt x seed pairs: every pair is drawn per head
THUMB_SIDE = 64  # regenerated images larger than this are shrunk to it (longer side) for the atlas


@dataclass
class AtlasImages:
    """Images generated again for the atlas (:func:`regenerate`), as ``(H, W, 3)`` uint8 arrays (at most
    ``THUMB_SIDE`` pixels a side): ``unguided[pair]`` without PAG; ``by_head[head][pair]`` with the head perturbed
    (plus the heads selected before the round); ``most_changed[head]``: the pair where the head's image differs
    most from the unguided one (mean absolute pixel difference)."""

    pairs: list
    unguided: list
    by_head: dict
    most_changed: dict


def _thumb(image):
    """A ``(3, H, W)`` float image in [0, 1] as an ``(h, w, 3)`` uint8 array, shrunk to ``THUMB_SIDE`` if larger."""
    import numpy as np
    from PIL import Image

    arr = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if max(arr.shape[:2]) <= THUMB_SIDE:
        return arr
    im = Image.fromarray(arr)
    im.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    return np.asarray(im)


def regenerate(run_dir: str | os.PathLike, pipe, round: int = 1, batch_size: int | str = "auto",
               execution: str | None = None) -> AtlasImages:
    """Every candidate of round ``round`` on every (prompt, seed) pair of the run, generated again with ``pipe``
    exactly as the search did (same settings, seeds and heads selected before the round), and the unguided image
    of each pair. ``pipe`` must be the run's model (its components and weights fingerprint are compared with
    ``settings.json``); a run made with a custom ``encode`` cannot be regenerated. Raises ``ValueError`` naming
    what does not match."""
    import torch

    from ..guided import disable, enable
    from ..heads import HeadSet
    from .hunter import _as_tensor_images, _auto_batch_size, _Hunter, _Job
    from .run_dir import pipeline_components

    run_dir = Path(run_dir)
    settings = read_settings(run_dir)
    if settings.get("encode") is not None:
        raise ValueError(f"{run_dir}: the search encoded its prompts with {settings['encode']}; its images cannot "
                         f"be generated again from the prompts")
    if "components" in settings and pipeline_components(pipe) != settings["components"]:
        raise ValueError(f"{run_dir}: the pipeline is not the one the search ran on (its components, dtype or "
                         f"weights fingerprint differ from settings.json; load it as the hunt did, e.g. the same "
                         f"--model and --dtype)")
    this = [r for r in read_records(run_dir) if r.get("round") == round]
    if not this:
        raise ValueError(f"{run_dir}: no records for round {round}")
    init = {(l, h): float(c) for l, h, c in settings.get("init") or []}
    selected = {head: init.get(head, float(settings["u"])) for head in parse_heads(this[0].get("selected"))}
    heads = sorted({parse_head(r["candidate"]) for r in this})
    prompts, seeds = settings["prompts"], settings["seeds"]
    hunter = _Hunter(pipe, None, prompts, seeds, settings["scale"], settings["u"], settings["mode"],
                     settings["guidance_scale"], settings["num_inference_steps"], 1, None, None, 0, 1, False,
                     settings.get("pipeline_kwargs") or {})
    n_pairs = len(hunter.pairs)
    keep_all = n_pairs <= ALL_PAIRS_UP_TO

    def chunks(items, size):
        return [items[i:i + size] for i in range(0, len(items), size)]

    jobs = [_Job(head, pair) for head in heads for pair in range(n_pairs)]
    unguided: list = [None] * n_pairs
    with torch.no_grad():  # no patch, CFG as in the search: the unguided image of every pair
        for pairs in chunks(list(range(n_pairs)), 64):
            out = pipe(prompt=[prompts[hunter.pairs[p][0]] for p in pairs],
                       generator=[torch.Generator(device="cpu").manual_seed(hunter.pairs[p][1]) for p in pairs],
                       **hunter._call_kwargs())
            for p, image in zip(pairs, _as_tensor_images(out.images)):
                unguided[p] = image
    enable(pipe, HeadSet([heads[0]]), execution=execution or settings.get("execution", "fused"),
           scale=settings["scale"], mode=settings["mode"])
    by_head: dict = {head: [None] * n_pairs for head in heads} if keep_all else {}
    best: dict = {}
    try:
        hunter.batch_size = (_auto_batch_size(hunter, heads, selected, len(jobs)) if batch_size == "auto"
                             else int(batch_size))
        for batch in chunks(jobs, hunter.batch_size):
            for job, image in zip(batch, hunter.generate(batch, selected)):
                diff = (image - unguided[job.pair]).abs().mean().item()
                if keep_all:
                    by_head[job.head][job.pair] = _thumb(image)
                if job.head not in best or diff > best[job.head][0]:
                    best[job.head] = (diff, job.pair, None if keep_all else _thumb(image))
    finally:
        disable(pipe)
    if not keep_all:  # only the most changed pair of each head is kept
        by_head = {head: {pair: thumb} for head, (_, pair, thumb) in best.items()}
    return AtlasImages(pairs=[(str(prompts[p]), s) for p, s in hunter.pairs], unguided=[_thumb(u) for u in unguided],
                       by_head=by_head, most_changed={head: pair for head, (_, pair, _) in best.items()})


def head_atlas(run_dir: str | os.PathLike, path: str | os.PathLike | None = None, round: int = 1,
               images: AtlasImages | None = None) -> Path:
    """Draw one tile per head as a grid: one row per layer, one column per head (rows as long as their layer's head
    count), each tile labelled underneath with ``L{layer}:H{head}``, its mean score in round ``round`` and its
    lowest image score (with that prompt and seed).

    With ``images`` (from :func:`regenerate`): for runs of at most ``ALL_PAIRS_UP_TO`` prompt x seed pairs a tile
    holds the head's image on every pair, under a reference tile of the unguided images in the same order, and the
    head's lowest-scored image is framed in red; for larger runs a tile shows, side by side, the unguided image and
    the head's image on the pair where they differ most. Without ``images``: the stored thumbnail of the first pair
    (``thumbs/L{layer}_H{head}.png``; a missing one is a grey tile). Pixels are drawn nearest-neighbour. Every
    round's picks get a frame in that round's colour and an ``R{round}`` tag (legend in the title). Tiles shrink
    for large grids. Writes ``path`` (default ``RUN_DIR/atlas.png``) and returns it.
    """
    import math
    import textwrap

    Figure = _matplotlib()
    from matplotlib.patches import Rectangle

    run_dir = Path(run_dir)
    settings = read_settings(run_dir)
    hpl = settings["heads_per_layer"]
    records = read_records(run_dir)
    picks = _round_picks(run_dir, records) if records else {}
    scores = _pair_scores(records, round)
    pairs = [(p, s) for p in range(len(settings.get("prompts") or [])) for s in settings.get("seeds") or []]
    path = Path(path) if path is not None else run_dir / "atlas.png"

    all_pairs = images is not None and all(len(v) == len(images.pairs) for v in images.by_head.values())
    step = 1.12  # image pitch inside a tile (data units; an image is 1 x 1)
    if all_pairs:
        per_row = min(len(images.pairs), 5)
        tile_w, tile_h = per_row * step - (step - 1), math.ceil(len(images.pairs) / per_row) * step - (step - 1)
    else:
        per_row = 1
        tile_w, tile_h = (2, 1) if images is not None else (1, 1)
    label_band = 0.8 * max(1.0, tile_h / 2)
    reference = 1 if all_pairs else 0  # a top row with the unguided images
    # The red frame marks a head's lowest-scored image when it is among the lowest 5 % of the round's images.
    round_scores = sorted(v for _, by_pair in scores.values() for v in by_pair.values())
    low_cut = round_scores[len(round_scores) // 20] if round_scores else float("-inf")
    rows, cols = max(len(hpl), 1) + reference, max(max(hpl, default=0), 1)
    pitch_x, pitch_y = tile_w + 0.25 * max(1, tile_h), tile_h + label_band
    tile_in = min(0.45 * max(1, 2 / tile_w) if images else 1.0, 16.0 / (cols * pitch_x), 18.0 / (rows * pitch_y))
    width, height = cols * pitch_x * tile_in, rows * pitch_y * tile_in
    fig_w = max(width, 7.0)
    title_pt = 9.0 if fig_w < 9 else 10.5
    wrap = max(60, int(fig_w * 72 / (0.55 * title_pt)))

    def pair_text(pair: int) -> str:
        if 0 <= pair < len(pairs):
            prompt = str(settings["prompts"][pairs[pair][0]])
            prompt = prompt if len(prompt) <= 12 else prompt[:11] + "..."
            return f"'{prompt}' s{pairs[pair][1]}"
        return f"pair {pair}"

    n = sum(hpl)
    lines = [f"{settings.get('model_class', '?')}, {n} heads: one tile per head; under it the head's mean score in "
             f"round {round} (perturbed alone" + (" with the heads selected before" if round > 1 else "")
             + f", PAG scale {settings.get('scale', '?')}), its lowest image score and where."]
    if all_pairs:
        lines.append(f"Each tile: the head's image on every prompt/seed ({len(images.pairs)}), in the order of the "
                     f"top 'no PAG' tile; red frame: its lowest-scored image, when among the round's lowest 5 %.")
    elif images is not None:
        lines.append("Each tile: left no PAG, right this head perturbed, on the prompt/seed where the two differ most.")
    else:
        missing_note = ""
        lines.append("Each tile: the stored thumbnail of the first prompt/seed only; headpag atlas RUN_DIR --model "
                     "MODEL shows every head where it changes the image most." + missing_note)
    if picks:
        lines.append("Frame and tag: picked by the search in " + ", ".join(
            f"round {rnd} ({ROUND_COLOURS[(rnd - 1) % len(ROUND_COLOURS)].removeprefix('tab:')})"
            for rnd in sorted(picks)) + ".")
    title = "\n".join(textwrap.fill(line, wrap) for line in lines)
    title_in = 0.25 + title.count("\n") * 1.35 * title_pt / 72 + 1.35 * title_pt / 72
    fig = Figure(figsize=(fig_w, height + title_in), dpi=100)
    ax = fig.add_axes((0, 0, 1, height / (height + title_in)))
    ax.set_xlim(0, fig_w / tile_in)
    ax.set_ylim(rows * pitch_y, 0)
    ax.set_axis_off()
    fontsize = min(9.0, max(5.0, tile_in * 72 * 0.2))

    def draw_grid(x0, y0, arrays, frame=None):
        for i, arr in enumerate(arrays):
            r, c = divmod(i, per_row)
            x, y = x0 + c * step, y0 + r * step
            ax.imshow(arr, extent=(x, x + 1, y + 1, y), interpolation="nearest")
            if i == frame:
                ax.add_patch(Rectangle((x + 0.03, y + 0.03), 0.94, 0.94, fill=False, edgecolor="red", lw=2))

    if reference:
        draw_grid(0.05, 0.05, images.unguided)
        ax.text(0.05 + tile_w + 0.3, 0.05 + tile_h / 2,
                "no PAG (reference), prompt/seed in reading order:\n" + textwrap.fill(
                    ", ".join(pair_text(i) for i in range(len(images.pairs))), 60),
                ha="left", va="center", fontsize=fontsize)

    missing = 0
    for layer, n_heads in enumerate(hpl):
        for head in range(n_heads):
            x0, y0 = head * pitch_x + 0.05, (layer + reference) * pitch_y + 0.05
            mean, by_pair = scores.get((layer, head), (None, {}))
            worst = min(by_pair, key=lambda p: by_pair[p]) if by_pair else None
            shown = images.by_head.get((layer, head)) if images is not None else None
            if shown is not None and all_pairs:
                draw_grid(x0, y0, shown, frame=worst if by_pair.get(worst, low_cut) < low_cut else None)
            elif shown is not None:
                (pair, arr), = shown.items()
                ax.imshow(images.unguided[pair], extent=(x0, x0 + 1, y0 + 1, y0), interpolation="nearest")
                ax.imshow(arr, extent=(x0 + 1, x0 + 2, y0 + 1, y0), interpolation="nearest")
                ax.plot([x0 + 1, x0 + 1], [y0, y0 + 1], color="white", lw=0.8)
            else:
                thumb = _load_thumb(thumbnail_path(run_dir, (layer, head))) if images is None else None
                if thumb is None:
                    missing += 1
                    ax.add_patch(Rectangle((x0, y0), tile_w, tile_h, facecolor="0.82", edgecolor="0.6", lw=0.5))
                    ax.text(x0 + tile_w / 2, y0 + tile_h / 2, "no\nimage", ha="center", va="center",
                            fontsize=fontsize, color="0.45")
                else:
                    ax.imshow(thumb, extent=(x0, x0 + 1, y0 + 1, y0), interpolation="nearest")
            for rnd, heads in sorted(picks.items()):
                if (layer, head) in heads:
                    colour = ROUND_COLOURS[(rnd - 1) % len(ROUND_COLOURS)]
                    pad = 0.04 * max(1, tile_h)
                    ax.add_patch(Rectangle((x0 - pad, y0 - pad), tile_w + 2 * pad, tile_h + 2 * pad, fill=False,
                                           edgecolor=colour, lw=3))
                    ax.text(x0 + 0.04, y0 + 0.04, f"R{rnd}", ha="left", va="top", fontsize=fontsize,
                            color="white", fontweight="bold", bbox=dict(facecolor=colour, lw=0, pad=1))
            label = f"L{layer}:H{head}"
            if mean is not None:
                label += f"  mean {mean:.3f}"
            if worst is not None:
                label += f"\nlowest {by_pair[worst]:.2f} at {pair_text(worst)}"
            if shown is not None and not all_pairs:
                label += f"\nshown: {pair_text(next(iter(shown)))}"
            ax.text(x0 + tile_w / 2, y0 + tile_h + 0.04 * max(1, tile_h), label, ha="center", va="top",
                    fontsize=fontsize, linespacing=1.1)

    fig.suptitle(title + (f"\n({missing} tiles without an image)" if missing and images is None else ""),
                 y=1 - 0.08 / (height + title_in), va="top", fontsize=title_pt)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def robust_range(values) -> tuple[float, float]:
    """Colour range of a heatmap panel: up to the largest value, down to the lowest value inside Tukey's lower
    fence (first quartile - 1.5 x interquartile range), so one outlier does not flatten the differences at the top.
    A constant panel gets a range of +-0.5 around its value."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0
    q1, q3 = np.percentile(values, [25, 75])
    fence = q1 - 1.5 * (q3 - q1)
    vmin, vmax = float(values[values >= fence].min()), float(values.max())
    if vmin == vmax:
        return vmin - 0.5, vmax + 0.5
    return vmin, vmax


def decimals_for(values, top: int = 5, least: int = 3, most: int = 6) -> int:
    """Decimals that tell the ``top`` highest distinct values apart (between ``least`` and ``most``)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    best = sorted(set(values[np.isfinite(values)].tolist()), reverse=True)[:top]
    for d in range(least, most + 1):
        if len({round(v, d) for v in best}) == len(best):
            return d
    return most


def _heatmap_panel(fig, ax, run_dir: Path, settings: dict, round: int) -> None:
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    hpl = settings["heads_per_layer"]
    grid, selected, chosen = score_grid(run_dir, round)
    rows, cols = grid.shape
    exists = np.arange(cols)[None, :] < np.asarray(hpl)[:, None]
    background = np.where(exists[..., None], 0.85, 1.0) * np.ones((rows, cols, 3))
    vmin, vmax = robust_range(grid)
    digits = decimals_for(grid)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0, 0, 0, 0), under="0.35")
    extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)
    ax.imshow(background, extent=extent, interpolation="nearest", aspect="auto")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, extent=extent,
                   interpolation="nearest", aspect="auto")
    objective = settings.get("objective")
    label = f"mean {objective}" if isinstance(objective, str) and objective else "mean objective score"
    clipped = bool(np.nanmin(grid) < vmin) if np.isfinite(grid).any() else False
    fig.colorbar(im, ax=ax, label=label, extend="min" if clipped else "neither")

    for layer, head in selected:
        if layer < rows and head < cols and not np.isfinite(grid[layer, head]):
            ax.plot(head, layer, "o", color="0.3", ms=4)
    for layer, head in chosen or ():
        if layer < rows and head < cols:
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    if rows * cols <= 150:
        for (layer, head), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = v < vmin or (v - vmin) / (vmax - vmin) < 0.6  # viridis: dark below ~60 %
                ax.text(head, layer, f"{v:.{digits}f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")

    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if cols <= 32:
        ax.set_xticks(range(cols))
    if rows <= 32:
        ax.set_yticks(range(rows))
    title = f"round {round}: mean score per candidate head"
    if chosen:
        title += f"\nred box = chosen ({', '.join(f'L{layer}:H{head}' for layer, head in sorted(chosen))})"
    if selected:
        title += "; dot = selected before" if chosen else "\ndot = selected before"
    if clipped:
        title += f"\ndark grey = below the colour range (outliers, < {vmin:.{digits}f})"
    ax.set_title(title, fontsize=10)


def score_heatmap(run_dir: str | os.PathLike, path: str | os.PathLike | None = None,
                  round: int | None = None) -> Path:
    """Draw the candidate mean scores as layer (rows, layer 0 on top) x head (columns) heatmaps, one panel per round
    (``round``: that round only; default every round with records), each with its own colour bar. The colour range
    of a panel is robust (:func:`robust_range`: an outlier below it is drawn dark grey, its value still written) and
    the values are written with the decimals that separate the highest ones (:func:`decimals_for`) on small grids.
    Light grey cells: heads not evaluated in that round (selected before it: a dot); white cells: heads the layer
    does not have; red box: chosen in the round (see :func:`score_grid`). Writes ``path`` (default
    ``RUN_DIR/heatmap.png``) and returns it; ValueError if a requested round has no records."""
    Figure = _matplotlib()

    run_dir = Path(run_dir)
    settings = read_settings(run_dir)
    hpl = settings["heads_per_layer"]
    if round is None:
        rounds = sorted({r["round"] for r in read_records(run_dir) if isinstance(r.get("round"), int)})
        if not rounds:
            raise ValueError(f"{run_dir}: no records (rounds with records: none)")
    else:
        rounds = [round]
    path = Path(path) if path is not None else run_dir / "heatmap.png"
    rows, cols = len(hpl), max(hpl, default=1)
    panel_w, panel_h = max(4.5, 0.75 * cols + 2.6), max(3.5, 0.45 * rows + 2.0)
    fig = Figure(figsize=(panel_w * len(rounds), panel_h), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(rounds), squeeze=False)[0]
    for ax, rnd in zip(axes, rounds):
        _heatmap_panel(fig, ax, run_dir, settings, rnd)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def make_atlas(run_dir: str | os.PathLike, pipe=None) -> list[Path]:
    """Both pictures of a run directory: ``RUN_DIR/atlas.png`` (:func:`head_atlas`; with ``pipe``, the run's model,
    each head on the prompt/seed where it changes the image most, from :func:`regenerate`) and
    ``RUN_DIR/heatmap.png`` (:func:`score_heatmap`, every round). What ``headpag atlas RUN_DIR`` calls."""
    images = regenerate(run_dir, pipe) if pipe is not None else None
    return [head_atlas(run_dir, images=images), score_heatmap(run_dir)]
