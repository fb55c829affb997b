"""The public API of the guided step: ``enable_fused`` / ``enable_eager`` / ``enable`` / ``disable`` /
``is_enabled`` / ``configure`` / ``set_row_heads`` / ``fused``."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from ..archs import call_pattern_of, get_denoiser
from ..heads import HeadSet
from .session import attach, detach, session_of
from .settings import EXECUTIONS, make_settings


def enable(pipe, heads, *, execution: str = "fused", scale: float = 3.0, u: float | None = None, mode: str = "joint",
           interval: tuple[float, float] = (0.0, 1.0)) -> None:
    """Patches ``pipe`` in place so that a plain ``pipe(...)`` call makes head-level PAG guided samples.

    Args:
        pipe: a diffusers pipeline whose denoiser has a registered architecture and whose class (or a base class)
            has a registered call pattern (``headpag.register_architecture`` / ``headpag.register_pipeline``).
        heads: the heads to perturb: a :class:`HeadSet` or anything it parses (``"4:0,4:3@0.5"``, tuples, dicts).
        execution: ``"fused"`` (the twins in the same batch, the kernel) or ``"eager"`` (a separate perturbed
            forward with the maps materialised: the oracle and baseline).
        scale: PAG scale ``w`` (>= 0; 0 computes no perturbed rows).
        u: overrides every head's coefficient (SoftPAG when < 1); None keeps the HeadSet's values.
        mode: ``"joint"`` (identity over the whole sequence) or ``"image"`` (identity on the image-image block).
        interval: ``(start, stop)``: step ``i`` of ``T`` is guided iff ``start <= i / T < stop``.

    Enabling again replaces the settings (never stacks); :func:`disable` restores the pipeline exactly. Every
    argument is checked before anything is attached.
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    call_pattern_of(pipe)  # an unknown pipeline raises before anything is attached
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError(
            f"{type(pipe).__name__} has a second denoiser (transformer_2, e.g. Wan 2.2 A14B's low-noise expert) that "
            f"runs part of the steps: headpag guides one denoiser, so guidance would be off on those steps; load the "
            f"pipeline without transformer_2 or use a single-denoiser checkpoint"
        )
    settings = make_settings(get_denoiser(pipe), heads, scale, u, mode, interval)
    attach(pipe, execution, settings)


def enable_fused(pipe, heads, *, scale: float = 3.0, u: float | None = None, mode: str = "joint",
                 interval: tuple[float, float] = (0.0, 1.0)) -> None:
    """:func:`enable` with ``execution="fused"``: the perturbed twins ride in the pipeline's own batch from their
    first fork unit on, and selected layers run the fused kernel."""
    enable(pipe, heads, execution="fused", scale=scale, u=u, mode=mode, interval=interval)


def enable_eager(pipe, heads, *, scale: float = 3.0, u: float | None = None, mode: str = "joint",
                 interval: tuple[float, float] = (0.0, 1.0)) -> None:
    """:func:`enable` with ``execution="eager"``: a separate perturbed forward per guided step with the perturbed
    maps ``(1-u)*A + u*P`` materialised. The oracle and benchmark baseline."""
    enable(pipe, heads, execution="eager", scale=scale, u=u, mode=mode, interval=interval)


def disable(pipe) -> None:
    """Removes every hook headpag attached to ``pipe`` (nothing to do when it is not patched; a ``pipe`` without a
    registered denoiser raises ``TypeError``)."""
    detach(pipe)


def is_enabled(pipe) -> bool:
    """Whether ``pipe``'s denoiser carries a headpag patch (``TypeError`` for a ``pipe`` without a registered
    denoiser)."""
    return session_of(pipe) is not None


def _session(pipe):
    session = session_of(pipe)
    if session is None:
        raise ValueError("pipe is not patched: call headpag.enable_fused(pipe, heads), enable_eager or enable first")
    return session


def configure(pipe, *, scale: float | None = None, heads=None, u: float | None = None,
              interval: tuple[float, float] | None = None, mode: str | None = None) -> None:
    """Changes the settings of a patched pipeline between calls, without re-patching (None keeps a setting)."""
    session = _session(pipe)
    s = session.settings
    new = make_settings(
        session.denoiser,
        heads if heads is not None else s.heads,
        s.scale if scale is None else scale,
        u,
        s.mode if mode is None else mode,
        s.interval if interval is None else interval,
    )
    session.select(new)


def set_row_heads(pipe, head_sets: Sequence | None) -> None:
    """One head set per perturbed row of the next calls, cycling (``head_sets[j % len]`` on the twin of cond row
    ``j``): many candidates in one batch, as HeadHunter evaluates them. Each row forks at its own first fork unit.
    ``None`` goes back to the configured heads. Every set is resolved against the denoiser and must be non-empty;
    on any error the previous row heads stay.
    """
    session = _session(pipe)
    resolved = None
    if head_sets is not None:
        if isinstance(head_sets, (str, HeadSet)) or not isinstance(head_sets, Sequence):
            raise TypeError(
                f"head_sets must be a sequence of head sets, one per row (e.g. ['1:0', '4:*']), or None; got "
                f"{type(head_sets).__name__} (for one set on every row use configure(pipe, heads=...))"
            )
        resolved = [HeadSet.from_any(h).resolve(session.denoiser) for h in head_sets]
        if not resolved:
            raise ValueError("head_sets must hold at least one head set (or be None for the configured heads)")
        empty = [i for i, h in enumerate(resolved) if not len(h)]
        if empty:
            raise ValueError(f"head_sets[{empty[0]}] is empty: every row's head set must hold at least one head")
    session.select(session.settings, resolved)


@contextlib.contextmanager
def fused(pipe, heads, **kwargs):
    """``with headpag.fused(pipe, heads, scale=...):`` enables the fused patch for the block, then disables it."""
    enable_fused(pipe, heads, **kwargs)
    try:
        yield pipe
    finally:
        disable(pipe)
