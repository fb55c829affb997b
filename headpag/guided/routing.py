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
layer and its processor. Only a family's known processors are accepted on selected layers (``Architecture.processors``):
the default ones, whose one attention call is the layer's whole attention, and the IP-Adapter ones
(:data:`ADDED_BRANCH_PROCESSORS`), whose first attention call is the layer's own and whose later calls attend the
same queries to the adapter's image tokens: only the first is routed, the branch stays diffusers'. Fused-QKV or user
processors raise instead of being misread, and so does a processor set up for diffusers' context parallelism.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from torch.overrides import TorchFunctionMode

#: Processors whose first attention call is the layer's own attention and whose later calls are an added branch that
#: stays diffusers' (IP-Adapter: the image queries attend to each adapter's image tokens, with the adapter's own key /
#: value projections, and the result is added with the adapter's scale). Only the first call is routed, and only
#: when its keys are as many as its queries (the layer's own attention is self / joint attention; an adapter call's
#: keys are its few image tokens): a processor whose own attention reached no entry point still raises.
ADDED_BRANCH_PROCESSORS = frozenset({
    "IPAdapterAttnProcessor2_0",  # UNet cross-attention (attn2, never a headpag layer); listed for completeness
    "SD3IPAdapterJointAttnProcessor2_0",
    "FluxIPAdapterAttnProcessor",
})


def check_default_processor(name: str, attn: torch.nn.Module, defaults: tuple[str, ...]) -> None:
    """Raises ``ValueError`` when the processor of the selected layer ``name`` is not one of the family's
    ``defaults`` (class names, from its architecture: its default processors and its IP-Adapter ones), or when
    diffusers' context parallelism is set on it. The classic ``AttnProcessor`` never is accepted: it computes the
    maps with ``baddbmm`` and a softmax, an attention call no entry point can take over."""
    processor = getattr(attn, "processor", None)
    cls = type(processor).__name__
    if cls not in defaults:
        hint = (" (set AttnProcessor2_0, e.g. model.set_attn_processor(AttnProcessor2_0()): the classic AttnProcessor "
                "never calls an attention function headpag can route)") if cls == "AttnProcessor" else ""
        raise ValueError(
            f"layer {name} has processor {cls}, not one of {sorted(defaults)}: headpag perturbs the default "
            f"attention and the IP-Adapter processors' own attention only (fused QKV or custom processors are not "
            f"supported on selected layers; choose other heads or restore the default processor){hint}"
        )
    check_not_context_parallel(name, processor)


def check_not_context_parallel(name: str, processor: object) -> None:
    """Raises ``ValueError`` when ``processor`` (of the selected layer ``name``) carries diffusers' context-parallel
    configuration (``model.enable_parallelism(config=ContextParallelConfig(...))`` sets ``_parallel_config`` on every
    attention processor): its attention call then shards heads (Ulysses) or tokens (ring) across ranks, which headpag
    does not follow (see the README, "Caches, IP-Adapter, context parallelism")."""
    config = getattr(processor, "_parallel_config", None)
    if config is not None and getattr(config, "context_parallel_config", None) is not None:
        raise ValueError(
            f"layer {name}: the model runs diffusers' context parallelism ({type(processor).__name__}._parallel_config "
            f"is set by enable_parallelism), which headpag does not support: load the model without "
            f"enable_parallelism / parallel_config to use headpag, or run it without headpag"
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

    def __init__(self, attention: Callable, coefficients: RowCoefficients, layer: str, limit: int | None = None):
        self.attention = attention
        self.c = coefficients
        self.layer = layer
        self.limit = limit  # routed calls at most (the rest are an added branch: ADDED_BRANCH_PROCESSORS); None: all
        self.calls = 0
        self.passed = 0  # attention calls of the layer left to diffusers (the added branch)
        self.busy = False  # inside headpag's own attention: its internal SDPA calls are not the layer's

    def takes(self, q: torch.Tensor, k: torch.Tensor, layout: str) -> bool:
        """Whether the layer's attention call of ``q, k`` (in ``layout``) is routed: not one of headpag's own internal
        calls, and, under a ``limit`` (a processor of :data:`ADDED_BRANCH_PROCESSORS`), one of the first ``limit``
        calls whose keys are as many as its queries (the layer's own self / joint attention; an adapter's call has
        the adapter's image tokens as keys). Calls left to diffusers are counted in ``passed``."""
        if self.busy:
            return False
        if self.limit is not None:
            tokens = 2 if layout == "bhnd" else 1
            if self.calls >= self.limit or q.shape[tokens] != k.shape[tokens]:
                self.passed += 1
                return False
        return True

    def attend(self, q, k, v, *, layout: str, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False, parallel_config=None) -> torch.Tensor:
        """The layer's perturbed attention of ``q, k, v`` in ``layout`` ("bhnd" or "bnhd") under the call's
        ``attn_mask`` (SDPA's convention: text padding, Chroma's query x key mask), whose batch dim, when not 1,
        must be the guided call's rows (a family widens the inputs the mask is built from)."""
        if dropout_p or is_causal or enable_gqa:
            raise ValueError(f"selected layer {self.layer} runs attention with dropout, a causal mask or grouped "
                             f"query heads: unsupported")
        if parallel_config is not None:
            raise ValueError(f"selected layer {self.layer} runs context-parallel attention (diffusers' "
                             f"enable_parallelism was called after headpag was enabled): headpag does not support "
                             f"context parallelism; load the model without enable_parallelism / parallel_config to "
                             f"use headpag, or call headpag.disable(pipe)")
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
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        call = dict(zip(names, args)) | kwargs
        if not self.route.takes(call["query"], call["key"], "bhnd"):
            return func(*args, **kwargs)
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
        if not _ACTIVE:
            return original(**kwargs)
        route = _ACTIVE[-1]
        if not route.takes(kwargs["query"], kwargs["key"], "bnhd"):
            busy, route.busy = route.busy, True  # the backend's own SDPA call is this same call, already counted
            try:
                return original(**kwargs)
            finally:
                route.busy = busy
        return route.attend(
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
    """Routes the attention calls made inside the block to ``route`` (only the first for a processor of
    :data:`ADDED_BRANCH_PROCESSORS`: the later ones are its IP-Adapter branch); raises when the block routed none."""
    if type(processor).__name__ in ADDED_BRANCH_PROCESSORS:
        route.limit = 1
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
