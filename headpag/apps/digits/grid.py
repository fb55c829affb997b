"""PNG grids of digit samples (PIL only)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch


def save_grid(rows: Sequence[torch.Tensor], path: str | os.PathLike, *, labels: Sequence[str] | None = None,
              zoom: int = 4, label_width: int = 0) -> str:
    """Writes a PNG: one row of images per tensor ``(N, 3, H, W)`` in [0, 1], nearest-neighbour upscaled by ``zoom``,
    a 1-pixel (zoomed) gap between images; ``labels`` (one per row) are drawn at the left when given."""
    from PIL import Image, ImageDraw

    rows = [r.detach().float().cpu().clamp(0, 1) for r in rows]
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    cell_h, cell_w = (h + 1) * zoom, (w + 1) * zoom
    left = label_width if labels else 0
    canvas = np.full((len(rows) * cell_h + zoom, left + n * cell_w + zoom, 3), 64, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            arr = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            arr = arr.repeat(zoom, axis=0).repeat(zoom, axis=1)
            y, x = i * cell_h + zoom, left + j * cell_w + zoom
            canvas[y:y + h * zoom, x:x + w * zoom] = arr
    image = Image.fromarray(canvas)
    if labels:
        draw = ImageDraw.Draw(image)
        for i, text in enumerate(labels):
            draw.text((4, i * cell_h + cell_h // 2 - 4), str(text), fill=(255, 255, 255))
    image.save(path, format="PNG")
    return str(path)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def save_table_figure(rows: Sequence[torch.Tensor], path: str | os.PathLike, *, labels: Sequence[Sequence[str]],
                      digits: Sequence[int], seeds: Sequence[int], title: Sequence[str], zoom: int = 4,
                      per_line: int = 4) -> str:
    """Writes a PNG that explains itself: ``title`` lines on top; a column header (each digit over its cell, the
    seeds of the cell's columns under it); one band per tensor ``(len(digits) * len(seeds), 3, H, W)`` in [0, 1]
    (digit-major, as the demo generates them): a cell per digit holding every seed, ``per_line`` seeds a line
    (seeds ``0..per_line-1`` on the first line, the next ones below), nearest-neighbour upscaled by ``zoom``; each
    band's ``labels`` (a few short lines: name, heads, score) at its left. Returns the path."""
    from PIL import Image, ImageDraw

    rows = [r.detach().float().cpu().clamp(0, 1) for r in rows]
    seeds = list(seeds)
    n_seeds = len(seeds)
    if any(len(r) != len(digits) * n_seeds for r in rows):
        raise ValueError(f"every row needs {len(digits)} digits x {n_seeds} seeds images")
    per_line = max(1, min(per_line, n_seeds))
    lines_per_cell = -(-n_seeds // per_line)
    h, w = rows[0].shape[-2:]
    img_w, img_h = w * zoom, h * zoom
    gap, cell_gap = max(1, zoom // 2), 4 * zoom
    big, small = _font(14), _font(11)
    line_h, small_h = 18, 14
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(14 + max(measure.textlength(text, font=small if i else big)
                           for lines in labels for i, text in enumerate(lines)))
    cell_w = per_line * img_w + (per_line - 1) * gap
    cell_h = lines_per_cell * img_h + (lines_per_cell - 1) * gap
    grid_w = len(digits) * cell_w + (len(digits) - 1) * cell_gap
    n_label_lines = max(len(lines) for lines in labels)
    band_h = max(cell_h, line_h + (n_label_lines - 1) * small_h) + 3 * zoom
    title_h = 8 + line_h * len(title)
    header_h = line_h + small_h + 6
    width = int(max(label_w + grid_w + 10, 12 + max(measure.textlength(t, font=big) for t in title)))
    height = title_h + header_h + len(rows) * band_h + 6
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(title):
        draw.text((6, 4 + i * line_h), text, fill=(0, 0, 0), font=big)
    y_header = title_h
    draw.text((6, y_header), "digit", fill=(0, 0, 0), font=big)
    seed_note = "seed" if lines_per_cell == 1 else f"seed (+{per_line} on each line below)"
    draw.text((6, y_header + line_h), seed_note, fill=(90, 90, 90), font=small)
    for d, digit in enumerate(digits):
        cx = label_w + d * (cell_w + cell_gap)
        draw.text((cx + cell_w / 2, y_header), str(digit), fill=(0, 0, 0), font=big, anchor="ma")
        draw.line((cx, y_header + line_h - 1, cx + cell_w, y_header + line_h - 1), fill=(150, 150, 150))
        for c in range(per_line):
            draw.text((cx + c * (img_w + gap) + img_w / 2, y_header + line_h + 1), str(seeds[c]), fill=(90, 90, 90),
                      font=small, anchor="ma")
    top = title_h + header_h
    for r, (row, lines) in enumerate(zip(rows, labels)):
        y = top + r * band_h
        if r % 2 == 0:
            draw.rectangle((0, y, width, y + band_h - 1), fill=(236, 236, 236))
        for i, text in enumerate(lines):
            draw.text((6, y + zoom + (0 if i == 0 else line_h + (i - 1) * small_h)), text,
                      fill=(0, 0, 0) if i == 0 else (60, 60, 60), font=big if i == 0 else small)
        for j, picture in enumerate(row):
            d, s = divmod(j, n_seeds)
            line, c = divmod(s, per_line)
            arr = (picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(arr).resize((img_w, img_h), Image.Resampling.NEAREST)
            image.paste(tile, (label_w + d * (cell_w + cell_gap) + c * (img_w + gap),
                               y + zoom + line * (img_h + gap)))
    image.save(path, format="PNG")
    return str(path)
