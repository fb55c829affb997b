"""The state of one guided denoiser call that the unit and attention hooks read: per-layer coefficients and
which rows each forward-loop unit runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..archs import LayerInfo, RowLayout
from ..heads import HeadSet
from ..kernels import codes_from_u
from .routing import RowCoefficients

if TYPE_CHECKING:
    from .session import GuidedSession


@dataclass(frozen=True)
class CallShape:
    """What a call state depends on: the pipeline's rows, the rows that are perturbed, the rows of the call, the
    text tokens of joint attention and the device. Call states are cached per shape."""

    layout: RowLayout
    perturbed_rows: range
    n_rows: int
    n_text: int
    device: str
    frames: int = 1  # rows per sample inside the denoiser (Architecture.rows_per_sample)


def layer_coefficients(layer: LayerInfo, head_sets: list[HeadSet], shape: CallShape, mode: str,
                       text_first: bool) -> RowCoefficients:
    """``u`` of one layer for every row of a call: ``head_sets[j]`` on perturbed row ``shape.perturbed_rows[j]``,
    0 elsewhere; with its per-(row, head) codes built from the same host values. With ``shape.frames > 1`` each
    row's ``u`` is repeated for its frames (the rows the layer's attention sees)."""
    u = torch.zeros(shape.n_rows, layer.heads, dtype=torch.float32)
    for row, heads in zip(shape.perturbed_rows, head_sets):
        for h, coef in heads.u_for(layer.index).items():
            u[row, h] = coef
    u = u.repeat_interleave(shape.frames, dim=0)
    codes = codes_from_u(u).tolist()
    n_text = shape.n_text if layer.kind == "joint" else 0
    return RowCoefficients(u.to(shape.device), codes, mode, n_text, text_first)


class UnitRows(NamedTuple):
    """The rows a forward-loop unit of a fused call runs: ``run`` (a slice of the call's rows where they are
    contiguous, as they are unless HeadHunter's twins fork at different units, else an index tensor), ``count``
    (how many), and ``gather``: for every row of the call, the row of the unit's output it takes (a twin that has not
    forked yet copies its cond row)."""

    run: slice | torch.Tensor
    count: int
    gather: torch.Tensor


class CallState:
    """State of one guided denoiser call, read by the unit and attention hooks.

    Perturbed row ``j`` (``shape.perturbed_rows[j]``) uses the head set ``session.heads_of(j)``: the same set for
    every row in a plain guided call, one set per row when HeadHunter evaluates many candidates in one batch.
    Fused calls run each forward-loop unit on the base rows and the twins that have forked by then; eager
    perturbed passes run every unit on all their rows.
    """

    def __init__(self, session: "GuidedSession", shape: CallShape):
        self.layout = shape.layout
        self.n_rows = shape.n_rows
        self.frames = shape.frames
        self.device = shape.device
        head_sets = [session.heads_of(j) for j in range(len(shape.perturbed_rows))]
        self.coefficients: dict[str, RowCoefficients] = {
            layer.name: layer_coefficients(layer, head_sets, shape, session.settings.mode, session.arch.text_first)
            for layer in session.selected_layers
        }
        # Unit position from which each twin carries its own rows.
        self.fork_positions = [session.fork_position_of(heads) for heads in head_sets]
        positions = range(len(session.units)) if session.fused else ()
        self._unit_rows = {position: self._rows_at(position) for position in positions}
        self.running: int | None = None  # position of a unit running on a subset of the rows
        self._subsets = {
            (name, position): _subset(full, self._run_rows(position), self.frames)
            for position, rows in self._unit_rows.items() if rows is not None
            for name, full in self.coefficients.items()
        }

    def coefficients_for(self, layer: str) -> RowCoefficients:
        """The layer's coefficients for the rows running now (a subset inside a unit some twins skip)."""
        if self.running is None:
            return self.coefficients[layer]
        return self._subsets[(layer, self.running)]

    def unit_rows(self, position: int) -> UnitRows | None:
        """For the unit at ``position`` of a fused call: the rows it runs, or None when every row runs."""
        return self._unit_rows.get(position)

    def _run_rows(self, position: int) -> list[int]:
        """Rows that run the unit at ``position``: the base rows and the twins forked by then."""
        n_base = self.layout.n_base
        return list(range(n_base)) + [n_base + j for j, fork in enumerate(self.fork_positions) if fork <= position]

    def _rows_at(self, position: int) -> UnitRows | None:
        forked = [j for j, fork in enumerate(self.fork_positions) if fork <= position]
        if len(forked) == len(self.fork_positions):
            return None
        n_base, cond = self.layout.n_base, self.layout.cond
        slot = {j: n_base + i for i, j in enumerate(forked)}
        gather = list(range(n_base)) + [slot.get(j, cond.start + j) for j in range(len(self.fork_positions))]
        run = self._run_rows(position)
        contiguous = run == list(range(run[0], run[0] + len(run)))
        return UnitRows(slice(run[0], run[0] + len(run)) if contiguous else torch.tensor(run, device=self.device),
                        len(run), torch.tensor(gather, device=self.device))


def _subset(full: RowCoefficients, rows: list[int], frames: int = 1) -> RowCoefficients:
    rows = [r * frames + f for r in rows for f in range(frames)]
    index = torch.tensor(rows, device=full.u.device)
    return RowCoefficients(full.u.index_select(0, index), [full.codes[r] for r in rows], full.mode, full.n_text,
                           full.text_first)
