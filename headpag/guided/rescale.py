"""``guidance_rescale`` as diffusers' PAG pipelines apply it: against the unperturbed cond prediction.

diffusers' SD / SDXL / HunyuanDiT pipelines end a CFG step with ``rescale_noise_cfg(noise_pred, noise_pred_text,
guidance_rescale)``, which scales ``noise_pred`` towards the standard deviation of ``noise_pred_text``; their PAG
pipelines pass the cond prediction of the unperturbed pass there. The fold moves the cond rows the pipeline sees
to ``cond + delta``, so the pipeline's own call would measure ``std(cond + delta)``. While a session of such a
pipeline exists, the ``rescale_noise_cfg`` of the module of every class in its MRO that defines ``__call__`` (the
loop of a subclass may be its base class's) is wrapped: a call whose
``noise_pred_text`` equals the moved cond rows of a guided step that just ran gets that step's unmoved cond rows;
every other call passes through unchanged.
"""

from __future__ import annotations

import sys
import weakref
from types import ModuleType
from typing import Callable

import torch

_NAME = "rescale_noise_cfg"


def loop_modules(pipe) -> list[ModuleType]:
    """The modules of the classes in ``pipe``'s MRO that define ``__call__`` and a ``rescale_noise_cfg``."""
    modules = []
    for cls in type(pipe).__mro__:
        module = sys.modules.get(cls.__module__) if "__call__" in vars(cls) else None
        if module is not None and getattr(module, _NAME, None) is not None and module not in modules:
            modules.append(module)
    return modules


class CondRecord:
    """The cond rows of the last guided CFG step of one session: as the pipeline sees them (moved) and unmoved."""

    def __init__(self):
        self.moved: torch.Tensor | None = None
        self.cond: torch.Tensor | None = None

    def set(self, moved: torch.Tensor, cond: torch.Tensor) -> None:
        self.moved, self.cond = moved, cond

    def clear(self) -> None:
        self.moved = self.cond = None

    def unmoved(self, noise_pred_text: torch.Tensor) -> torch.Tensor | None:
        """The unmoved cond rows when ``noise_pred_text`` is this record's moved cond rows (or their leading
        channels: a learned-sigma model's prediction without its variance channels, HunyuanDiT), else None."""
        moved, cond = self.moved, self.cond
        if moved is None or moved.device != noise_pred_text.device:
            return None
        if moved.dtype != noise_pred_text.dtype:  # a loop that casts the prediction up first (LTX-Video's .float())
            if not (moved.is_floating_point() and noise_pred_text.is_floating_point()
                    and torch.finfo(noise_pred_text.dtype).bits > torch.finfo(moved.dtype).bits):
                return None
            moved, cond = moved.to(noise_pred_text.dtype), cond.to(noise_pred_text.dtype)
        if moved.dim() >= 2 and moved.shape != noise_pred_text.shape:
            channels = noise_pred_text.shape[1] if noise_pred_text.dim() == moved.dim() else None
            if channels is None or moved.shape[1] <= channels or moved.shape[2:] != noise_pred_text.shape[2:]:
                return None
            moved, cond = moved[:, :channels], cond[:, :channels]
        if moved.shape != noise_pred_text.shape or not torch.equal(moved, noise_pred_text):
            return None
        return cond


class _WrappedRescale:
    """The wrapper installed in one pipeline module while at least one record holds it."""

    def __init__(self, module: ModuleType, original: Callable):
        self.module, self.original = module, original
        self.records: "weakref.WeakSet[CondRecord]" = weakref.WeakSet()

    def __call__(self, noise_cfg, noise_pred_text, *args, **kwargs):
        for record in list(self.records):
            cond = record.unmoved(noise_pred_text)
            if cond is not None:
                noise_pred_text = cond
                break
        return self.original(noise_cfg, noise_pred_text, *args, **kwargs)


def hold(pipe, record: CondRecord) -> list[ModuleType]:
    """Wraps the ``rescale_noise_cfg`` of ``pipe``'s loop modules (once per module), registers ``record`` with each
    and returns them; empty when there is none (no guidance rescale headpag can honour)."""
    modules = loop_modules(pipe)
    for module in modules:
        current = getattr(module, _NAME)
        if not isinstance(current, _WrappedRescale):
            current = _WrappedRescale(module, current)
            setattr(module, _NAME, current)
        current.records.add(record)
    return modules


def release(modules: list[ModuleType], record: CondRecord) -> None:
    """Unregisters ``record`` from each module's wrapper; the last one out restores the original function."""
    for module in modules:
        current = getattr(module, _NAME, None)
        if isinstance(current, _WrappedRescale):
            current.records.discard(record)
            if not len(current.records):
                setattr(module, _NAME, current.original)
