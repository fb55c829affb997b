"""headpag.kernels: the fused perturbed-attention op, its torch path and its materialised-map oracle.

Imports torch and, when installed, triton; never diffusers, and nothing of headpag outside this folder. The rest of
headpag imports from here: the entry points, ``MODES`` and the per-(row, head) codes ``PLAIN`` (u == 0), ``SOFT``
(0 < u < 1) and ``IDENTITY`` (u == 1).
"""

if __name__ != "headpag.kernels":
    # This folder is installed as headpag.kernels only. From a checkout's root (``python -m pytest``, ``python -m
    # headpag``) it is also importable as a top-level "kernels", and transformers imports whatever answers to
    # that name while probing for the hub package "kernels". Stay inert there: importing the modules twice would
    # register the custom op twice, from two copies of the code.
    __all__ = []
else:
    from .constants import IDENTITY, MODES, PLAIN, SOFT
    from .flops import attention_flops
    from .perturbed_attention import HAS_TRITON, perturbed_attention, perturbed_attention_from_plan
    from .reference import reference_attention
    from .validation import codes_from_u

    __all__ = [
        "HAS_TRITON",
        "IDENTITY",
        "MODES",
        "PLAIN",
        "SOFT",
        "attention_flops",
        "codes_from_u",
        "perturbed_attention",
        "perturbed_attention_from_plan",
        "reference_attention",
    ]
