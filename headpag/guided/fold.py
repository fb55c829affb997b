"""Combining predictions: which steps are guided (the PAG interval) and the fold of ``delta`` into the base rows.

Guided prediction (epsilon or flow-matching velocity alike), PAG scale ``w``, CFG scale ``s``:

    CFG on:  pred = pred_uncond + s * (pred_cond - pred_uncond) + w * (pred_cond - pred_perturbed)
    CFG off: pred = pred_cond + w * (pred_cond - pred_perturbed)

The fold adds ``delta = w * (pred_cond - pred_perturbed)`` (computed in float32) to the uncond and the cond rows
alike; the pipeline's own CFG arithmetic then returns exactly the guided prediction for any ``s``.
"""

from __future__ import annotations

import torch

from ..archs import RowLayout


def step_position(timesteps: torch.Tensor, timestep) -> int:
    """Index of ``timestep`` (a number, 0-d or per-row tensor) in the scheduler's ``timesteps`` (nearest)."""
    t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
    return int(torch.argmin((timesteps.detach().float().cpu() - t).abs()))


def pipeline_step(scheduler, timestep) -> tuple[int, int, float]:
    """``(i, T, t)``: the pipeline step ``i`` of ``T`` a denoiser call at ``timestep`` belongs to, counted as the
    pipeline counts them, and the scheduler timestep ``t`` of the call.

    A scheduler of order 1 makes one call per entry of ``scheduler.timesteps``: the call's entry is the nearest
    timestep. A second-order scheduler (Heun, DPM2: ``order == 2``) makes two calls per step over ``2 T - 1``
    entries that repeat timesteps, so the entry is the scheduler's own ``step_index`` (its ``begin_index``, or
    the nearest timestep, before its first ``step``) and the step is ``entry // order``."""
    timesteps = scheduler.timesteps
    order = int(getattr(scheduler, "order", 1) or 1)
    entry = None
    if order > 1:
        entry = getattr(scheduler, "step_index", None)
        if entry is None:
            entry = getattr(scheduler, "begin_index", None)
    if entry is None:
        entry = step_position(timesteps, timestep)
    entry = min(int(entry), len(timesteps) - 1)
    return entry // order, -(-len(timesteps) // order), float(timesteps[entry])


def in_interval(i: int, T: int, interval: tuple[float, float]) -> bool:
    """Step ``i`` of ``T`` is guided iff ``start <= i / T < stop``."""
    start, stop = interval
    return start <= i / T < stop


def guided_channels(model) -> int | None:
    """Channels the fold applies to: the predicted noise/velocity only for learned-sigma models (their output
    has twice the input channels, the second half a per-row variance), all channels (None) otherwise."""
    cfg = getattr(model, "config", None)
    c_in, c_out = getattr(cfg, "in_channels", None), getattr(cfg, "out_channels", None)
    return c_in if c_in and c_out and c_out == 2 * c_in else None


def perturbation_delta(cond: torch.Tensor, perturbed: torch.Tensor, scale: float, channels: int | None) -> torch.Tensor:
    """``scale * (cond - perturbed)`` in float32 (over the first ``channels`` channels when given)."""
    delta = scale * (cond.float() - perturbed.float())
    if channels is not None:
        delta[:, channels:] = 0
    return delta


def fold(base: torch.Tensor, layout: RowLayout, delta: torch.Tensor) -> torch.Tensor:
    """``base`` (the ``n_base`` rows) with ``delta`` added to the cond rows and to the uncond rows alike."""
    out = base.float().clone()
    out[layout.cond.start:layout.cond.stop] += delta
    if layout.uncond is not None:
        out[layout.uncond.start:layout.uncond.stop] += delta
    return out.to(base.dtype)
