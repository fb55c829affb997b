"""What a patched pipeline does: the heads (resolved, per-head ``u``), PAG scale, identity mode and interval, and
how it is executed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..heads import HeadSet
from ..kernels import MODES


#: How a guided step is executed: "fused" (the twins in the same batch, the kernel) or "eager" (a separate
#: perturbed forward with the maps materialised: the oracle and baseline).
EXECUTIONS = ("fused", "eager")


@dataclass(frozen=True)
class Settings:
    """Checked settings of one guided session.

    Attributes:
        heads: the selected heads, resolved against the denoiser (wildcards expanded, per-head ``u``).
        scale: PAG scale ``w`` (>= 0; 0 computes no perturbed rows).
        mode: ``"joint"`` (identity over the whole sequence) or ``"image"`` (identity on the image-image block).
        interval: ``(start, stop)``: step ``i`` of ``T`` is guided iff ``start <= i / T < stop``.
    """

    heads: HeadSet
    scale: float
    mode: str
    interval: tuple[float, float]


def make_settings(denoiser, heads, scale, u, mode, interval) -> Settings:
    """Checks every setting (a ``ValueError`` / ``TypeError`` names the argument) and resolves ``heads``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    heads = HeadSet.from_any(heads).resolve(denoiser)
    if u is not None:
        heads = heads.with_u(u)
    if not len(heads):
        raise ValueError("heads is empty: select at least one (layer, head), e.g. '4:0' or [(4, 0)]")
    return Settings(heads, check_scale(scale), mode, check_interval(interval))


def check_interval(interval) -> tuple[float, float]:
    """``(start, stop)`` with ``0 <= start <= stop <= 1``; raises ``ValueError`` otherwise."""
    try:
        start, stop = (float(x) for x in interval)
    except (TypeError, ValueError) as err:
        raise ValueError(f"interval must be a pair (start, stop) of numbers in [0, 1], got {interval!r}") from err
    if not (0.0 <= start <= stop <= 1.0) or math.isnan(start) or math.isnan(stop):
        raise ValueError(f"interval must satisfy 0 <= start <= stop <= 1, got {interval!r}")
    return start, stop


def check_scale(scale) -> float:
    """The PAG scale ``w``: a finite number >= 0."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a finite number >= 0, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale}")
    return scale
