"""Perturbed attention inside a selected layer, whatever its (default) processor.

A selected attention module keeps its own processor: projections, q/k norms (SD3.5), rotary embeddings (Flux)
and output projections stay diffusers' code. Only its ``F.scaled_dot_product_attention`` call is routed, by a
``TorchFunctionMode`` active while the module runs, to ``headpag.kernels.perturbed_attention_from_plan`` (fused:
``u`` and its per-(row, head) codes are built together on the host once per call layout, so the kernel entry never reads ``u``
back and never waits for the device) or to the materialised-map ``reference_attention`` (eager), with a per-(row,
head) coefficient ``u``. This is the same mechanism diffusers' own ``apply_layer_skip(skip_attention_scores=True)``
uses.

Only the default processors are accepted on selected layers: their single SDPA call over ``(B, H, N, D)`` is
the layer's whole attention. IP-Adapter, fused-QKV or user processors raise instead of being misread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Default processor classes per attention kind, by name (diffusers' own classes).
DEFAULT_PROCESSORS = {"AttnProcessor2_0", "AttnProcessor", "JointAttnProcessor2_0", "FluxAttnProcessor"}


def check_default_processor(name: str, attn: torch.nn.Module) -> None:
    """Raises ``ValueError`` when the processor of the selected layer ``name`` is not a default one."""
    processor = getattr(attn, "processor", None)
    cls = type(processor).__name__
    if cls not in DEFAULT_PROCESSORS:
        raise ValueError(
            f"layer {name} has processor {cls}, not one of the defaults {sorted(DEFAULT_PROCESSORS)}: headpag "
            f"perturbs the default attention only (IP-Adapter, fused QKV or custom processors are not supported "
            f"on selected layers; choose other heads or restore the default processor)"
        )


@dataclass(frozen=True)
class RowCoefficients:
    """``u`` of one layer for one call: a float32 ``(rows, H)`` tensor on the call's device, its per-(row, head)
    codes (nested Python ints: ``PLAIN``, ``SOFT``, ``IDENTITY``), the mode and where the text tokens sit."""

    u: torch.Tensor
    codes: list[list[int]]
    mode: str
    n_text: int
    text_first: bool


class PerturbedSDPA(TorchFunctionMode):
    """Replaces ``F.scaled_dot_product_attention(q, k, v)`` of shape ``(B, H, N, D)`` by ``attention(q, k, v,
    u, ...)`` while active. ``attention`` is ``perturbed_attention_from_plan`` (fused) or ``reference_attention``
    (eager)."""

    def __init__(self, attention: Callable, coefficients: RowCoefficients, layer: str):
        super().__init__()
        self.attention = attention
        self.c = coefficients
        self.layer = layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        call = dict(zip(names, args)) | kwargs
        if call.get("attn_mask") is not None:
            raise ValueError(
                f"an attention mask reached the selected layer {self.layer}; perturbed attention supports unmasked "
                f"attention only (choose heads in other layers or drop the mask)"
            )
        if call.get("dropout_p", 0.0) or call.get("is_causal", False) or call.get("enable_gqa", False):
            raise ValueError(f"selected layer {self.layer} runs attention with dropout or a causal mask: unsupported")
        q, k, v = call["query"], call["key"], call["value"]
        if q.shape[0] != self.c.u.shape[0]:
            raise RuntimeError(
                f"layer {self.layer}: attention batch {q.shape[0]} does not match the {self.c.u.shape[0]} rows headpag "
                f"prepared; a module between the denoiser's entry and this layer changed the batch"
            )
        return self.attention(
            q, k, v, self.c.u, layout="bhnd", mode=self.c.mode, n_text=self.c.n_text, text_first=self.c.text_first,
            scale=call.get("scale"), plan=self.c.codes,
        )
