"""headpag: fused Triton kernels for head-level perturbed-attention guidance on diffusers pipelines."""

from .heads import HeadSet
from .kernels import perturbed_attention, reference_attention
from .layers import LayerInfo, list_layers

__version__ = "0.1.0"

__all__ = ["HeadSet", "LayerInfo", "list_layers", "perturbed_attention", "reference_attention", "__version__"]
