"""Pictures of a HeadHunter run directory: a thumbnail atlas of every head and a per-round score heatmap.

A run directory (written by :mod:`headpag.hunter`) holds:

- ``settings.json``: ``{"model_class": str, "heads_per_layer": [int, ...], "layer_names": [str, ...], ...}``;
- ``records-rank{R}.jsonl``: one JSON line per finished candidate evaluation, ``{"round": 1, "selected": [[layer,
  head], ...] (the set before the round), "candidate": [layer, head], "scores": [...], "mean": float, "seconds":
  float}``; a truncated last line (a crash while writing) is ignored;
- ``thumbs/L{layer}_H{head}.png``: the candidate's first image in round 1 (may be missing for some heads);
- ``summary.json`` (optional here): ``{"heads": [[layer, head, u], ...], ...}``, the final selection.

Public API: :func:`read_records`, :func:`score_grid`, :func:`head_atlas`, :func:`score_heatmap`,
:func:`make_atlas` (what ``headpag atlas RUN_DIR`` calls). Drawing needs matplotlib (``pip install
'headpag[plots]'``); it is imported lazily and drawn on a standalone Agg figure (no pyplot, no global state).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["read_records", "score_grid", "head_atlas", "score_heatmap", "make_atlas"]

_RECORDS = re.compile(r"^records-rank(\d+)\.jsonl$")
_HEAD_STR = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:@.*)?$")
_REQUIRED = ("round", "candidate", "mean")

Head = tuple[int, int]


# --------------------------------------------------------------------------------------------------- reading


def _record_files(run_dir: Path) -> list[Path]:
    """``records-rank{R}.jsonl`` files of ``run_dir``, in rank order (rank 10 after rank 2)."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _RECORDS.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _parse_line(raw: bytes) -> dict:
    """One record from one line; ValueError (with the reason) if it is not a JSON object with the needed keys."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    return rec


def read_records(run_dir: str | os.PathLike) -> list[dict]:
    """All complete records of all ranks (``records-rank0.jsonl``, ``records-rank1.jsonl``, ...), file by file.

    Blank lines are skipped; so is a malformed *last* line of a file (a write cut short by a crash). A malformed
    line anywhere else raises ValueError naming the file and the 1-based line number. A run directory without
    records files gives ``[]``.
    """
    run_dir = Path(run_dir)
    records: list[dict] = []
    for path in _record_files(run_dir):
        lines = [(i, raw) for i, raw in enumerate(path.read_bytes().split(b"\n"), 1) if raw.strip()]
        for n, (lineno, raw) in enumerate(lines):
            try:
                records.append(_parse_line(raw))
            except ValueError as e:
                if n == len(lines) - 1:
                    break  # truncated trailing line
                raise ValueError(f"{path} line {lineno}: malformed record: {e}") from None
    return records


def _settings(run_dir: Path) -> dict:
    path = run_dir / "settings.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a HeadHunter run directory?")
    settings = json.loads(path.read_text())
    hpl = settings.get("heads_per_layer")
    if not isinstance(hpl, list) or not all(isinstance(n, int) and n >= 0 for n in hpl):
        raise ValueError(f"{path}: 'heads_per_layer' must be a list of non-negative ints, got {hpl!r}")
    return settings


def _head(x: Any) -> Head | None:
    """``(layer, head)`` from ``[layer, head, ...]``, ``{"layer": .., "head": ..}`` or ``"12:3[@u]"``; else None."""
    if isinstance(x, str):
        m = _HEAD_STR.match(x)
        return (int(m.group(1)), int(m.group(2))) if m else None
    if isinstance(x, dict):
        x = [x.get("layer"), x.get("head")]
    if isinstance(x, (list, tuple)) and len(x) >= 2:
        layer, head = x[0], x[1]
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (layer, head)):
            return (layer, head)
    return None


def _heads(items: Any) -> set[Head]:
    return {h for h in map(_head, items or ()) if h is not None}


def _final_heads(run_dir: Path) -> set[Head] | None:
    """The run's final selection from ``summary.json`` (keys ``heads``/``entries``/``selected``), or None."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    for key in ("heads", "entries", "selected"):
        value = summary.get(key)
        if isinstance(value, dict):  # a HeadSet file stored inline
            value = value.get("entries")
        if isinstance(value, list):
            return _heads(value)
    return None


def _chosen_in_round(run_dir: Path, records: list[dict], rnd: int) -> set[Head] | None:
    """Heads the search added in round ``rnd``: in round ``rnd+1``'s ``selected`` but not in round ``rnd``'s (for
    the last round with records, ``summary.json``'s heads instead of round ``rnd+1``'s). None if unknown."""
    this = [r for r in records if r.get("round") == rnd]
    if not this:
        return None
    before = _heads(this[0].get("selected"))
    after_recs = [r for r in records if r.get("round") == rnd + 1]
    if after_recs:
        after = _heads(after_recs[0].get("selected"))
    elif rnd == max(r.get("round", 0) for r in records):
        after = _final_heads(run_dir)
        if after is None:
            return None
    else:
        return None
    return after - before


def score_grid(run_dir: str | os.PathLike, round: int = 1):
    """Round ``round``'s candidate mean scores as a ``(layers, max heads)`` float array (NaN where a head was not
    evaluated in that round or does not exist), plus the set of ``(layer, head)`` selected *before* the round and
    the set chosen *in* it (None if that cannot be told). A head evaluated more than once gets the average mean."""
    import numpy as np

    run_dir = Path(run_dir)
    hpl = _settings(run_dir)["heads_per_layer"]
    records = read_records(run_dir)
    this = [r for r in records if r.get("round") == round]
    if not this:
        rounds = sorted({r.get("round") for r in records}, key=str)
        raise ValueError(f"{run_dir}: no records for round {round} (rounds with records: {rounds or 'none'})")
    sums: dict[Head, list[float]] = {}
    for rec in this:
        head = _head(rec["candidate"])
        if head is None or head[0] >= len(hpl) or head[1] >= hpl[head[0]]:
            raise ValueError(f"{run_dir}: candidate {rec['candidate']!r} is not a head of this model ({hpl})")
        mean = rec["mean"]
        sums.setdefault(head, []).append(float("nan") if mean is None else float(mean))
    grid = np.full((len(hpl), max(hpl, default=0)), np.nan)
    for (layer, head), means in sums.items():
        grid[layer, head] = sum(means) / len(means)
    selected = _heads(this[0].get("selected"))
    return grid, selected, _chosen_in_round(run_dir, records, round)


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
    settings = _settings(run_dir)
    hpl = settings["heads_per_layer"]
    records = read_records(run_dir)
    chosen = _chosen_in_round(run_dir, records, round) or set()
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
            thumb = _load_thumb(run_dir / "thumbs" / f"L{layer}_H{head}.png")
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
    settings = _settings(run_dir)
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
