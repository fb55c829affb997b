"""What headpag knows about each model family (one module per denoiser class) and each pipeline's call pattern.

Every module of this package other than the shared ones (``registry``, ``pipelines``, ``blocks``) describes one
family: it registers its :class:`Architecture` and the call patterns of its diffusers pipelines on import. Adding a
family means adding one module here; it is found and imported without being listed anywhere.
"""

import importlib
import pkgutil

from .pipelines import CALL_PATTERNS, CallPattern, RowLayout, call_pattern_of, register_pipeline
from .registry import (
    Architecture, LayerInfo, architecture_of, block_list, denoisers_of, forward_units, get_denoiser, list_layers,
    model_class_name, named_denoisers, register_architecture, registered_architectures,
)

_SHARED = {"registry", "pipelines", "loop_reading", "blocks"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Architecture", "CALL_PATTERNS", "CallPattern", "LayerInfo", "RowLayout", "architecture_of", "block_list",
    "call_pattern_of", "denoisers_of", "forward_units", "get_denoiser", "list_layers", "model_class_name",
    "named_denoisers", "register_architecture", "register_pipeline", "registered_architectures",
]
