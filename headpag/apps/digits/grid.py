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
