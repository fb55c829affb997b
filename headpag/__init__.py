"""headpag: fused Triton kernels for head-level perturbed-attention guidance on diffusers pipelines.

Layers, each importing only from the ones below it: ``headpag.apps`` (CLI, demo, digits model, benchmarks) ->
``headpag.search`` (HeadHunter) -> ``headpag.guiders`` (the Modular Diffusers guider) -> ``headpag.guided`` (the
guided step) -> ``headpag.heads`` (HeadSet) -> ``headpag.archs`` (model families, pipeline call patterns) ->
``headpag.kernels`` (the op).

The public names below are imported on first use (PEP 562 ``__getattr__``), so ``import headpag`` alone, and with
it ``headpag --help``, does not import torch or diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "headpag.archs": ("Architecture", "CallPattern", "LayerInfo", "forward_units", "get_denoiser", "list_layers",
                      "register_architecture", "register_pipeline"),
    "headpag.guided": ("configure", "disable", "enable", "enable_eager", "enable_fused", "fused", "is_enabled",
                       "set_row_heads"),
    "headpag.heads": ("HeadSet",),
    "headpag.kernels": ("perturbed_attention", "reference_attention"),
    "headpag.search": ("HuntResult", "hunt"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF) + ["__version__"]

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from .archs import (
        Architecture, CallPattern, LayerInfo, forward_units, get_denoiser, list_layers, register_architecture,
        register_pipeline,
    )
    from .guided import configure, disable, enable, enable_eager, enable_fused, fused, is_enabled, set_row_heads
    from .heads import HeadSet
    from .kernels import perturbed_attention, reference_attention
    from .search import HuntResult, hunt


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'headpag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
