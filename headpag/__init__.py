"""headpag: fused Triton kernels for head-level perturbed-attention guidance on diffusers pipelines.

Layers, each importing only from the ones below it: ``headpag.apps`` (CLI, demo, digits model, benchmarks) ->
``headpag.search`` (HeadHunter) -> ``headpag.guided`` (the guided step) -> ``headpag.heads`` (HeadSet) ->
``headpag.archs`` (model families, pipeline call patterns) -> ``headpag.kernels`` (the op).
"""

from .archs import (
    Architecture, CallPattern, LayerInfo, forward_units, get_denoiser, list_layers, register_architecture,
    register_pipeline,
)
from .guided import configure, disable, enable, enable_eager, enable_fused, fused, is_enabled, set_row_heads
from .heads import HeadSet
from .kernels import perturbed_attention, reference_attention
from .search import HuntResult, hunt

__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "CallPattern",
    "HeadSet",
    "HuntResult",
    "LayerInfo",
    "configure",
    "disable",
    "enable",
    "enable_eager",
    "enable_fused",
    "forward_units",
    "fused",
    "get_denoiser",
    "hunt",
    "is_enabled",
    "list_layers",
    "perturbed_attention",
    "reference_attention",
    "register_architecture",
    "register_pipeline",
    "set_row_heads",
    "__version__",
]
