"""headpag: fused Triton kernels for head-level perturbed-attention guidance on diffusers pipelines."""

from .heads import HeadSet
from .hunter import HuntResult, hunt
from .kernels import perturbed_attention, reference_attention
from .layers import LayerInfo, list_layers
from .patch import configure, disable, enable_eager, enable_fused, fused

__version__ = "0.1.0"

__all__ = [
    "HeadSet",
    "HuntResult",
    "LayerInfo",
    "configure",
    "disable",
    "enable_eager",
    "enable_fused",
    "fused",
    "hunt",
    "list_layers",
    "perturbed_attention",
    "reference_attention",
    "__version__",
]
