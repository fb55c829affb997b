"""What a patched pipeline does: the heads (resolved, per-head ``u``), PAG scale, identity mode and interval, and
how it is executed."""

from __future__ import annotations

import math
import operator
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
        adaptive_scale: ``a`` of diffusers' ``pag_adaptive_scale`` (>= 0): at scheduler timestep ``t`` the PAG scale
            is ``max(0, scale - a * (1000 - t))`` (:meth:`scale_at`); 0 keeps ``scale`` on every step.
        refresh: ``k`` (>= 1): the perturbed rows run on the first guided step of a sampling run and every ``k``-th
            step after it; the guided steps in between run the plain batch and reuse the difference
            ``cond - perturbed`` of the last step that ran them, times their own PAG scale. 1: every guided step.
    """

    heads: HeadSet
    scale: float
    mode: str
    interval: tuple[float, float]
    adaptive_scale: float = 0.0
    refresh: int = 1

    def scale_at(self, timestep: float | None) -> float:
        """The PAG scale at scheduler timestep ``timestep`` (None: unknown, as on the meta device: ``scale``)."""
        if not self.adaptive_scale or timestep is None:
            return self.scale
        return max(0.0, self.scale - self.adaptive_scale * (1000.0 - float(timestep)))


def make_settings(denoiser, heads, scale, u, mode, interval, adaptive_scale=0.0, refresh=1) -> Settings:
    """Checks every setting (a ``ValueError`` / ``TypeError`` names the argument) and resolves ``heads``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    heads = HeadSet.from_any(heads).resolve(denoiser)
    if u is not None:
        heads = heads.with_u(u)
    if not len(heads):
        raise ValueError("heads is empty: select at least one (layer, head), e.g. '4:0' or [(4, 0)]")
    return Settings(heads, check_scale(scale), mode, check_interval(interval),
                    check_scale(adaptive_scale, "adaptive_scale"), check_refresh(refresh))


def check_refresh(refresh) -> int:
    """``refresh``: an integer >= 1 (the perturbed rows run every ``refresh``-th guided step)."""
    what = f"refresh must be an integer >= 1 (1: the perturbed rows run on every guided step), got {refresh!r}"
    if isinstance(refresh, bool):
        raise TypeError(what)
    try:
        value = operator.index(refresh)
    except TypeError:
        raise TypeError(what) from None
    if value < 1:
        raise ValueError(what)
    return value


def check_interval(interval) -> tuple[float, float]:
    """``(start, stop)`` with ``0 <= start <= stop <= 1``; raises ``ValueError`` otherwise."""
    try:
        start, stop = (float(x) for x in interval)
    except (TypeError, ValueError) as err:
        raise ValueError(f"interval must be a pair (start, stop) of numbers in [0, 1], got {interval!r}") from err
    if not (0.0 <= start <= stop <= 1.0) or math.isnan(start) or math.isnan(stop):
        raise ValueError(f"interval must satisfy 0 <= start <= stop <= 1, got {interval!r}")
    return start, stop


def check_scale(scale, name: str = "scale") -> float:
    """The PAG scale ``w`` (or another scale called ``name``): a finite number >= 0."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a finite number >= 0, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {scale}")
    return scale
