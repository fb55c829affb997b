"""headpag.kernels: the fused perturbed-attention op, its torch path and its materialised-map oracle.

Imports torch and, when installed, triton; never diffusers.
"""

from .flops import attention_flops
from .perturbed_attention import HAS_TRITON, perturbed_attention
from .reference import reference_attention
from .validation import IDENTITY, PLAIN, SOFT, plan_from_u

__all__ = [
    "HAS_TRITON",
    "IDENTITY",
    "PLAIN",
    "SOFT",
    "attention_flops",
    "perturbed_attention",
    "plan_from_u",
    "reference_attention",
]
