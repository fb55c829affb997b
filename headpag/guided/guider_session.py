"""The session headpag's Modular guider (``headpag.guiders.HeadPerturbedAttentionGuidance``) attaches to a denoiser
for the cond call of a guided step: that call runs with the perturbed twins of its rows (fused: in the same batch,
forking at their first fork unit; eager: a separate perturbed forward with the maps materialised) and returns its
rows followed by the twins' rows, for the guider to split and combine."""

from __future__ import annotations

import torch

from ..archs import RowLayout
from .rows import first_tensor, replace_sample
from .session import GuidedSession
from .settings import Settings


class GuiderSession(GuidedSession):
    """A session the guider attaches for one cond call: every call while it is armed is guided with all its rows
    cond (the guider's cond batch), and returns those rows followed by their perturbed twins' rows."""

    def __init__(self, denoiser: torch.nn.Module, execution: str, settings: Settings):
        super().__init__(denoiser, execution, settings)
        self.armed: tuple[int, float] | None = None  # (step, PAG scale) of the guided call to make
        self.base_rows: int | None = None  # rows of the guided call's cond batch, once it ran

    def _caller(self):
        return None

    def _timing(self, caller, timestep) -> tuple[int, float] | None:
        return self.armed

    def _layout(self, caller, arguments: dict, batch: int, context: str | None) -> RowLayout | None:
        return RowLayout(batch, range(batch), None)

    def _shift(self, out):
        raise RuntimeError(
            f"{type(self.denoiser).__name__} was called for a side pass (a skip-layer pass) inside the cond batch of "
            f"HeadPerturbedAttentionGuidance: headpag's guider runs only the cond and uncond batches; use "
            f"diffusers' SkipLayerGuidance without headpag"
        )

    def _finish(self, out, layout: RowLayout, perturbed_out):
        if self.base_rows is not None:
            raise RuntimeError(
                f"{type(self.denoiser).__name__} was called twice inside one cond batch of "
                f"HeadPerturbedAttentionGuidance: the guider expects one denoiser call between prepare_models and "
                f"cleanup_models"
            )
        self.base_rows = layout.n_base
        if perturbed_out is None:  # fused: the twins are the call's last rows
            return out
        return replace_sample(out, torch.cat([first_tensor(out), first_tensor(perturbed_out)]))
