"""Perturbed attention inside a selected layer: its attention call is taken over wherever the model makes it.

A selected attention module keeps its own processor: projections, q/k norms (SD3.5), rotary embeddings (Flux)
and output projections stay diffusers' code. Only the attention itself is routed, while the module runs, to
``headpag.kernels.perturbed_attention_from_plan`` (fused: ``u`` and its per-(row, head) codes are built together on
the host once per call layout, so the kernel entry never reads ``u`` back and never waits for the device) or to the
materialised-map ``reference_attention`` (eager), with a per-(row, head) coefficient ``u``. Two entry points:

- diffusers' ``dispatch_attention_fn``, which every attention backend (native, flash, flex, sage, xformers, ...)
  is reached through: while any guided session exists, every registered backend function is wrapped; a wrapper
  hands a call made inside a routed layer to headpag in the ``(B, N, H, D)`` layout it arrives in (the kernel's
  ``bnhd``, no copy) and passes every other call through unchanged;
- ``F.scaled_dot_product_attention`` ``(B, H, N, D)``, for processors that call it directly (SD3, the UNets,
  PixArt), through a ``TorchFunctionMode``: the mechanism of diffusers' own ``apply_layer_skip``.

Never silent: a selected layer whose forward made no attention call through either entry point raises, naming the
layer and its processor. Only the default processors are accepted on selected layers (their one attention call is
the layer's whole attention); IP-Adapter, fused-QKV or user processors raise instead of being misread.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from torch.overrides import TorchFunctionMode

def check_default_processor(name: str, attn: torch.nn.Module, defaults: tuple[str, ...]) -> None:
    """Raises ``ValueError`` when the processor of the selected layer ``name`` is not one of the family's
    ``defaults`` (class names, from its architecture). The classic ``AttnProcessor`` never is: it computes the maps
    with ``baddbmm`` and a softmax, an attention call no entry point can take over."""
    processor = getattr(attn, "processor", None)
    cls = type(processor).__name__
    if cls not in defaults:
        hint = (" (set AttnProcessor2_0, e.g. model.set_attn_processor(AttnProcessor2_0()): the classic AttnProcessor "
                "never calls an attention function headpag can route)") if cls == "AttnProcessor" else ""
        raise ValueError(
            f"layer {name} has processor {cls}, not one of the defaults {sorted(defaults)}: headpag "
            f"perturbs the default attention only (IP-Adapter, fused QKV or custom processors are not supported "
            f"on selected layers; choose other heads or restore the default processor){hint}"
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


class LayerRoute:
    """The attention of one selected layer during one forward: where its calls go, and how many arrived."""

    def __init__(self, attention: Callable, coefficients: RowCoefficients, layer: str):
        self.attention = attention
        self.c = coefficients
        self.layer = layer
        self.calls = 0
        self.busy = False  # inside headpag's own attention: its internal SDPA calls are not the layer's

    def attend(self, q, k, v, *, layout: str, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False, parallel_config=None) -> torch.Tensor:
        """The layer's perturbed attention of ``q, k, v`` in ``layout`` ("bhnd" or "bnhd") under the call's
        ``attn_mask`` (SDPA's convention: text padding, Chroma's query x key mask), whose batch dim, when not 1,
        must be the guided call's rows (a family widens the inputs the mask is built from)."""
        if dropout_p or is_causal or enable_gqa:
            raise ValueError(f"selected layer {self.layer} runs attention with dropout, a causal mask or grouped "
                             f"query heads: unsupported")
        if parallel_config is not None:
            raise ValueError(f"selected layer {self.layer} runs context-parallel attention: headpag does not "
                             f"support context parallelism; disable it or choose no heads there")
        if attn_mask is not None and attn_mask.dim() in (2, 4) and attn_mask.shape[0] not in (1, q.shape[0]):
            raise RuntimeError(
                f"layer {self.layer}: the attention mask has {attn_mask.shape[0]} rows for an attention batch of "
                f"{q.shape[0]}: the input it was built from was not widened with the twins (register it in the "
                f"family's row_args)"
            )
        if q.shape[0] != self.c.u.shape[0]:
            raise RuntimeError(
                f"layer {self.layer}: attention batch {q.shape[0]} does not match the {self.c.u.shape[0]} rows headpag "
                f"prepared; a module between the denoiser's entry and this layer changed the batch"
            )
        self.calls += 1
        self.busy = True
        try:
            return self.attention(q, k, v, self.c.u, layout=layout, mode=self.c.mode, n_text=self.c.n_text,
                                  text_first=self.c.text_first, scale=scale, plan=self.c.codes, attn_mask=attn_mask)
        finally:
            self.busy = False


class _RoutedSDPA(TorchFunctionMode):
    """Hands ``F.scaled_dot_product_attention(q, k, v)`` of shape ``(B, H, N, D)`` to the active route."""

    def __init__(self, route: LayerRoute):
        super().__init__()
        self.route = route

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.route.busy:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        call = dict(zip(names, args)) | kwargs
        return self.route.attend(
            call["query"], call["key"], call["value"], layout="bhnd", attn_mask=call.get("attn_mask"),
            dropout_p=call.get("dropout_p", 0.0), is_causal=call.get("is_causal", False), scale=call.get("scale"),
            enable_gqa=call.get("enable_gqa", False),
        )


# The route of the selected layer running now (innermost last), read by the dispatch wrappers.
_ACTIVE: list[LayerRoute] = []


def _routing_backend(original: Callable) -> Callable:
    """A backend function that hands calls made inside a routed layer to headpag, ``(B, N, H, D)`` as given."""

    def backend(**kwargs):
        if not _ACTIVE or _ACTIVE[-1].busy:
            return original(**kwargs)
        return _ACTIVE[-1].attend(
            kwargs["query"], kwargs["key"], kwargs["value"], layout="bnhd", attn_mask=kwargs.get("attn_mask"),
            dropout_p=kwargs.get("dropout_p", 0.0), is_causal=kwargs.get("is_causal", False),
            scale=kwargs.get("scale"), enable_gqa=kwargs.get("enable_gqa", False),
            parallel_config=kwargs.get("_parallel_config"),
        )

    backend.__wrapped__ = original
    return backend


class _DispatchRouting:
    """Wraps every backend of diffusers' attention registry while at least one session holds it."""

    def __init__(self):
        self.holders = 0
        self.originals: dict = {}

    def acquire(self) -> None:
        if self.holders == 0:
            backends = _AttentionBackendRegistry._backends
            self.originals = dict(backends)
            for name, fn in self.originals.items():
                backends[name] = _routing_backend(fn)
        self.holders += 1

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            backends = _AttentionBackendRegistry._backends
            for name, fn in self.originals.items():
                if getattr(backends.get(name), "__wrapped__", None) is fn:
                    backends[name] = fn
            self.originals = {}


DISPATCH_ROUTING = _DispatchRouting()


@contextlib.contextmanager
def routed(route: LayerRoute, processor: object):
    """Routes the attention calls made inside the block to ``route``; raises when the block made none."""
    _ACTIVE.append(route)
    try:
        with _RoutedSDPA(route):
            yield route
    finally:
        _ACTIVE.pop()
    if route.calls == 0:
        raise RuntimeError(
            f"selected layer {route.layer} ran no attention through headpag: its processor "
            f"{type(processor).__name__} called neither diffusers' dispatch_attention_fn (any attention backend) nor "
            f"F.scaled_dot_product_attention, so its heads would be left unperturbed; restore the layer's default "
            f"processor or choose heads in other layers"
        )
