"""The public API of the guided step: ``enable_fused`` / ``enable_eager`` / ``enable`` / ``disable`` /
``is_enabled`` / ``configure`` / ``set_row_heads`` / ``fused``.

Each acts on every denoiser of the pipeline (``headpag.archs.denoisers_of``): one guided session per denoiser, all
with the same settings, the heads resolved against each. Wan 2.2 A14B runs ``transformer`` on the high-noise steps
and ``transformer_2`` on the others: both are guided, the PAG interval read over the whole schedule."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from ..archs import call_pattern_of, named_denoisers
from ..heads import HeadSet
from .session import GuidedSession, attach, detach, sessions_of
from .settings import EXECUTIONS, make_settings


def _per_denoiser(named, make) -> list:
    """``make(item)`` for each ``(attribute, item)`` of ``named`` (a denoiser or its session); a ``ValueError`` on
    a second denoiser (heads that do not resolve on ``transformer_2``) names it."""
    out = []
    for name, item in named:
        try:
            out.append(make(item))
        except ValueError as err:
            if not out:
                raise
            raise ValueError(
                f"pipe.{name}: {err} (headpag guides every denoiser of the pipeline with the same heads, resolved "
                f"against each, and pipe.{name}'s layers x heads differ from pipe.{named[0][0]}'s)"
            ) from err
    return out


def enable(pipe, heads, *, execution: str = "fused", scale: float = 3.0, u: float | None = None, mode: str = "joint",
           interval: tuple[float, float] = (0.0, 1.0), adaptive_scale: float = 0.0, refresh: int = 1) -> None:
    """Patches ``pipe`` in place so that a plain ``pipe(...)`` call makes head-level PAG guided samples.

    Args:
        pipe: a diffusers pipeline whose denoiser has a registered architecture (``headpag.register_architecture``)
            and whose class (or a base class) has a registered call pattern (``headpag.register_pipeline``) or whose
            loop follows a built-in pattern (read from its ``__call__``: ``headpag.archs.loop_reading``).
        heads: the heads to perturb: a :class:`HeadSet` or anything it parses (``"4:0,4:3@0.5"``, tuples, dicts).
        execution: ``"fused"`` (the twins in the same batch, the kernel) or ``"eager"`` (a separate perturbed
            forward with the maps materialised: the oracle and baseline).
        scale: PAG scale ``w`` (>= 0; 0 computes no perturbed rows).
        u: overrides every head's coefficient (SoftPAG when < 1); None keeps the HeadSet's values.
        mode: ``"joint"`` (identity over the whole sequence) or ``"image"`` (identity on the image-image block).
        interval: ``(start, stop)``: step ``i`` of ``T`` is guided iff ``start <= i / T < stop``.
        adaptive_scale: diffusers' ``pag_adaptive_scale`` ``a`` (>= 0): the PAG scale at scheduler timestep ``t`` is
            ``max(0, scale - a * (1000 - t))``; a step where it is 0 runs no perturbed rows.
        refresh: ``k`` (an integer >= 1): the perturbed rows run on the first guided step of each sampling run and on
            every ``k``-th step after it; a guided step in between runs the plain batch (no twins, no perturbed pass)
            and adds its own PAG scale times the difference ``cond - perturbed`` of the last step that ran them. 1 (the
            default): every guided step runs them.

    The pipeline's own ``guidance_rescale`` call argument is applied as diffusers' PAG pipelines apply it: against
    the unperturbed cond prediction (``rescale.py``).

    A pipeline with several denoisers (Wan 2.2 A14B: ``transformer`` and ``transformer_2``, each running part of
    the steps) gets the same settings on each, ``heads`` resolved against each denoiser (a ``ValueError`` naming
    ``transformer_2`` when they do not resolve there).

    Enabling again replaces the settings (never stacks); :func:`disable` restores the pipeline exactly. Every
    argument is checked before anything is attached, and a failure while attaching leaves the pipeline unpatched.
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    call_pattern_of(pipe)  # an unknown pipeline raises before anything is attached
    settings = _per_denoiser(named_denoisers(pipe),
                             lambda d: make_settings(d, heads, scale, u, mode, interval, adaptive_scale, refresh))
    attach(pipe, execution, settings)


def enable_fused(pipe, heads, *, scale: float = 3.0, u: float | None = None, mode: str = "joint",
                 interval: tuple[float, float] = (0.0, 1.0), adaptive_scale: float = 0.0, refresh: int = 1) -> None:
    """:func:`enable` with ``execution="fused"``: the perturbed twins ride in the pipeline's own batch from their
    first fork unit on, and selected layers run the fused kernel."""
    enable(pipe, heads, execution="fused", scale=scale, u=u, mode=mode, interval=interval,
           adaptive_scale=adaptive_scale, refresh=refresh)


def enable_eager(pipe, heads, *, scale: float = 3.0, u: float | None = None, mode: str = "joint",
                 interval: tuple[float, float] = (0.0, 1.0), adaptive_scale: float = 0.0, refresh: int = 1) -> None:
    """:func:`enable` with ``execution="eager"``: a separate perturbed forward per guided step with the perturbed
    maps ``(1-u)*A + u*P`` materialised. The oracle and benchmark baseline."""
    enable(pipe, heads, execution="eager", scale=scale, u=u, mode=mode, interval=interval,
           adaptive_scale=adaptive_scale, refresh=refresh)


def disable(pipe) -> None:
    """Removes every hook headpag attached to ``pipe``, on each of its denoisers (nothing to do when it is not
    patched; a ``pipe`` without a registered denoiser raises ``TypeError``)."""
    detach(pipe)


def is_enabled(pipe) -> bool:
    """Whether ``pipe``'s denoisers carry a headpag patch (``TypeError`` for a ``pipe`` without a registered
    denoiser)."""
    return any(session is not None for _, session in sessions_of(pipe))


def _sessions(pipe) -> list[tuple[str, GuidedSession]]:
    """``(attribute, session)`` of each denoiser of a patched ``pipe``."""
    named = sessions_of(pipe)
    if all(session is None for _, session in named):
        raise ValueError("pipe is not patched: call headpag.enable_fused(pipe, heads), enable_eager or enable first")
    missing = [name for name, session in named if session is None]
    if missing:
        raise ValueError(f"pipe.{missing[0]} carries no headpag patch while the pipeline's other denoisers do (was it "
                         f"replaced after enabling?): call headpag.enable again")
    return list(named)


def _select_all(sessions: list[tuple[str, GuidedSession]], settings: list, row_heads: list) -> None:
    """``session.select(settings[i], row_heads[i])`` on every session, all or none: on an error the sessions already
    changed get their previous settings back."""
    previous = [(session.settings, session.row_heads) for _, session in sessions]
    done = []
    try:
        for (_, session), new, rows in zip(sessions, settings, row_heads):
            session.select(new, rows)
            done.append(session)
    except BaseException:
        for session, (old, old_rows) in zip(done, previous):
            session.select(old, old_rows)
        raise


def configure(pipe, *, scale: float | None = None, heads=None, u: float | None = None,
              interval: tuple[float, float] | None = None, mode: str | None = None,
              adaptive_scale: float | None = None, refresh: int | None = None) -> None:
    """Changes the settings of a patched pipeline between calls, without re-patching (None keeps a setting), on
    each of its denoisers."""
    sessions = _sessions(pipe)

    def make(session: GuidedSession):
        s = session.settings
        return make_settings(
            session.denoiser,
            heads if heads is not None else s.heads,
            s.scale if scale is None else scale,
            u,
            s.mode if mode is None else mode,
            s.interval if interval is None else interval,
            s.adaptive_scale if adaptive_scale is None else adaptive_scale,
            s.refresh if refresh is None else refresh,
        )

    new = _per_denoiser(sessions, make)
    _select_all(sessions, new, [None] * len(sessions))


def set_row_heads(pipe, head_sets: Sequence | None) -> None:
    """One head set per perturbed row of the next calls, cycling (``head_sets[j % len]`` on the twin of cond row
    ``j``): many candidates in one batch, as HeadHunter evaluates them. Each row forks at its own first fork unit.
    ``None`` goes back to the configured heads. Every set is resolved against each denoiser of the pipeline and
    must be non-empty; on any error the previous row heads stay (on every denoiser).
    """
    sessions = _sessions(pipe)
    resolved: list = [None] * len(sessions)
    if head_sets is not None:
        if isinstance(head_sets, (str, HeadSet)) or not isinstance(head_sets, Sequence):
            raise TypeError(
                f"head_sets must be a sequence of head sets, one per row (e.g. ['1:0', '4:*']), or None; got "
                f"{type(head_sets).__name__} (for one set on every row use configure(pipe, heads=...))"
            )
        sets = [HeadSet.from_any(h) for h in head_sets]
        resolved = _per_denoiser(sessions, lambda session: [h.resolve(session.denoiser) for h in sets])
        if not sets:
            raise ValueError("head_sets must hold at least one head set (or be None for the configured heads)")
        empty = [i for i, h in enumerate(resolved[0]) if not len(h)]
        if empty:
            raise ValueError(f"head_sets[{empty[0]}] is empty: every row's head set must hold at least one head")
    _select_all(sessions, [session.settings for _, session in sessions], resolved)


@contextlib.contextmanager
def fused(pipe, heads, **kwargs):
    """``with headpag.fused(pipe, heads, scale=...):`` enables the fused patch for the block, then disables it."""
    enable_fused(pipe, heads, **kwargs)
    try:
        yield pipe
    finally:
        disable(pipe)
