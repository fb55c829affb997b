"""Pictures of a HeadHunter run directory: a thumbnail atlas of every head and a per-round score heatmap.

It reads the run directory through :mod:`headpag.search.run_dir`, which owns the format: the settings (heads per
layer), every round's records, the round-1 thumbnails and the final selection.

Public API: :func:`score_grid`, :func:`head_atlas`, :func:`score_heatmap`,
:func:`make_atlas` (what ``headpag atlas RUN_DIR`` calls). Drawing needs matplotlib (``pip install
'headpag[plots]'``); it is imported lazily and drawn on a standalone Agg figure (no pyplot, no global state).
"""

from __future__ import annotations

import os
from pathlib import Path

from .run_dir import Head, chosen_in_round, parse_head, parse_heads, read_records, read_settings, thumbnail_path

__all__ = ["score_grid", "head_atlas", "score_heatmap", "make_atlas"]


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


def head_atlas(run_dir: str | os.PathLike, path: str | os.PathLike | None = None, round: int = 1) -> Path:
    """Draw every head's round-1 thumbnail (``thumbs/L{layer}_H{head}.png``) as a grid: one row per layer, one
    column per head (rows as long as their layer's head count), each tile labelled ``L{layer}:H{head}`` underneath.
    A missing thumbnail is a grey tile (still labelled). Heads chosen in round ``round`` (when that can be told,
    see :func:`score_grid`) get an orange frame. Tiles shrink for large grids (24 x 24 heads gives a figure of
    about 15 x 19 inches at 100 dpi). Writes ``path`` (default ``RUN_DIR/atlas.png``) and returns it.
    """
    Figure = _matplotlib()
    from matplotlib.patches import Rectangle

    run_dir = Path(run_dir)
    settings = read_settings(run_dir)
    hpl = settings["heads_per_layer"]
    records = read_records(run_dir)
    chosen = chosen_in_round(run_dir, records, round) or set()
    path = Path(path) if path is not None else run_dir / "atlas.png"

    rows, cols = max(len(hpl), 1), max(max(hpl, default=0), 1)
    pitch_x, pitch_y = 1.1, 1.35  # tile = 1 x 1 data units; the rest is gap and the label band
    tile_in = min(1.0, 16.0 / (cols * pitch_x), 18.0 / (rows * pitch_y))
    width, height = cols * pitch_x * tile_in, rows * pitch_y * tile_in
    fig_w = max(width, 4.5)  # room for the title on small grids
    title_pt = 9.0 if fig_w < 8 else 11.0
    title_in = 0.2 + 2 * 1.3 * title_pt / 72  # two lines
    fig = Figure(figsize=(fig_w, height + title_in), dpi=100)
    ax = fig.add_axes((0, 0, 1, height / (height + title_in)))
    ax.set_xlim(0, fig_w / tile_in)
    ax.set_ylim(rows * pitch_y, 0)
    ax.set_axis_off()
    fontsize = min(9.0, max(4.0, tile_in * 72 * 0.16))

    missing = 0
    for layer, n_heads in enumerate(hpl):
        for head in range(n_heads):
            x0, y0 = head * pitch_x + 0.05, layer * pitch_y + 0.05
            thumb = _load_thumb(thumbnail_path(run_dir, (layer, head)))
            if thumb is None:
                missing += 1
                ax.add_patch(Rectangle((x0, y0), 1, 1, facecolor="0.82", edgecolor="0.6", lw=0.5))
                ax.text(x0 + 0.5, y0 + 0.5, "no\nthumb", ha="center", va="center", fontsize=fontsize, color="0.45")
            else:
                ax.imshow(thumb, extent=(x0, x0 + 1, y0 + 1, y0), interpolation="nearest")
            if (layer, head) in chosen:
                ax.add_patch(Rectangle((x0, y0), 1, 1, fill=False, edgecolor="tab:orange", lw=2.5))
            ax.text(x0 + 0.5, y0 + 1.04, f"L{layer}:H{head}", ha="center", va="top", fontsize=fontsize)

    n = sum(hpl)
    title = f"{settings.get('model_class', '?')}: round-1 thumbnails of {n} heads"
    title += f" ({missing} missing)" if missing else ""
    title += f"\norange frame = chosen in round {round}" if chosen else ""
    fig.suptitle(title, y=1 - 0.1 / (height + title_in), va="top", fontsize=title_pt)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def score_heatmap(run_dir: str | os.PathLike, path: str | os.PathLike | None = None, round: int = 1) -> Path:
    """Draw round ``round``'s candidate mean scores as a layer (rows, layer 0 on top) x head (columns) heatmap,
    with a colour bar labelled with the objective's mean. Light grey cells: heads not evaluated in that round
    (e.g. selected before it, marked with a dot); white cells: heads the layer does not have. Heads chosen in the
    round (see :func:`score_grid`) get a red box. Values are written in the cells for small grids. Writes ``path``
    (default ``RUN_DIR/heatmap.png``) and returns it; ValueError if the round has no records.
    """
    Figure = _matplotlib()
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    run_dir = Path(run_dir)
    settings = read_settings(run_dir)
    hpl = settings["heads_per_layer"]
    grid, selected, chosen = score_grid(run_dir, round)
    path = Path(path) if path is not None else run_dir / "heatmap.png"
    rows, cols = grid.shape

    exists = np.arange(cols)[None, :] < np.asarray(hpl)[:, None]
    background = np.where(exists[..., None], 0.85, 1.0) * np.ones((rows, cols, 3))
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0, 0, 0, 0))

    fig = Figure(figsize=(max(4.5, 0.32 * cols + 2.2), max(3.5, 0.32 * rows + 1.6)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)
    ax.imshow(background, extent=extent, interpolation="nearest", aspect="auto")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, extent=extent,
                   interpolation="nearest", aspect="auto")
    objective = settings.get("objective")
    label = f"mean {objective}" if isinstance(objective, str) and objective else "mean objective score"
    fig.colorbar(im, ax=ax, label=label)

    small = rows * cols <= 150
    for layer, head in selected:
        if layer < rows and head < cols and not np.isfinite(grid[layer, head]):
            ax.plot(head, layer, "o", color="0.3", ms=4)
    for layer, head in chosen or ():
        if layer < rows and head < cols:
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    if small:
        for (layer, head), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = (v - vmin) / (vmax - vmin) < 0.6  # viridis: dark below ~60 %
                ax.text(head, layer, f"{v:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")

    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if cols <= 32:
        ax.set_xticks(range(cols))
    if rows <= 32:
        ax.set_yticks(range(rows))
    title = f"round {round}: candidate mean scores"
    if chosen:
        title += f"\nred box = chosen ({', '.join(f'L{layer}:H{head}' for layer, head in sorted(chosen))})"
    if selected:
        title += "; dot = selected before" if chosen else "\ndot = selected before"
    ax.set_title(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def make_atlas(run_dir: str | os.PathLike) -> list[Path]:
    """Both pictures of a run directory: ``RUN_DIR/atlas.png`` (:func:`head_atlas`) and ``RUN_DIR/heatmap.png``
    (:func:`score_heatmap` of round 1). What ``headpag atlas RUN_DIR`` calls."""
    return [head_atlas(run_dir), score_heatmap(run_dir)]
