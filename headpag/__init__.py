"""headpag: fused Triton kernels for head-level perturbed-attention guidance on diffusers pipelines."""

from .kernels import perturbed_attention, reference_attention

__version__ = "0.1.0"

__all__ = ["perturbed_attention", "reference_attention", "__version__"]
