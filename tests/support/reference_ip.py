"""An IP-Adapter-aware perturbed pass written independently of headpag, for :mod:`support.reference`'s fold.

An IP-Adapter processor makes two kinds of SDPA calls: the layer's own attention over all the tokens the module was
given (its ``hidden_states`` and, for a joint layer, its ``encoder_hidden_states``: queries and keys alike), and one
call per adapter whose queries are the image tokens only and whose keys are the adapter's few image tokens.
:class:`OwnAttentionIdentity` tells them apart by those token counts, read from the module's arguments, not by
their order (headpag routes the first call only): on the layer's own call the selected heads return their values (the
identity map, ``u = 1`` in ``mode="joint"``), the other heads and every adapter call are plain SDPA.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .models import denoiser


class OwnAttentionIdentity(TorchFunctionMode):
    """SDPA ``(B, H, N, D)`` with the identity map on ``heads`` for the calls whose queries and keys are both the
    ``tokens`` the module was given (set per forward).

    ``own_calls`` / ``branch_calls`` count the two kinds of calls seen."""

    def __init__(self, heads: list[int]):
        super().__init__()
        self.heads = list(heads)
        self.tokens = -1
        self.own_calls = 0
        self.branch_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        call = dict(zip(("query", "key", "value"), args)) | kwargs
        q, v = call["query"], call["value"]
        if not q.shape[-2] == call["key"].shape[-2] == self.tokens:
            self.branch_calls += 1
            return out
        self.own_calls += 1
        out = out.clone()
        out[:, self.heads] = v[:, self.heads].to(out.dtype)
        return out


def own_identity_copy(pipe, layers: dict[str, list[int]]) -> tuple[torch.nn.Module, dict[str, OwnAttentionIdentity]]:
    """A copy of ``pipe``'s denoiser whose attention modules ``layers`` (module name -> heads) run under
    :class:`OwnAttentionIdentity` (with the native SDPA backend), and those modes by name (their call counts)."""
    model = copy.deepcopy(denoiser(pipe))
    modes = {}
    for name, heads in layers.items():
        attn = model.get_submodule(name)
        if hasattr(attn.processor, "_attention_backend"):
            attn.processor._attention_backend = "native"
        modes[name] = mode = OwnAttentionIdentity(heads)
        original = attn.forward

        def forward(hidden_states, *args, _original=original, _mode=mode, **kwargs):
            text = kwargs.get("encoder_hidden_states")
            _mode.tokens = hidden_states.shape[1] + (text.shape[1] if text is not None else 0)
            with _mode:
                return _original(hidden_states, *args, **kwargs)

        attn.forward = forward
    return model, modes
