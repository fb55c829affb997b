"""Materialised-map oracle for ``perturbed_attention``: builds ``(1-u)*A + u*P`` as an N x N matrix.

Slow and memory-hungry by design; it is the independent reference the fused kernel and the torch path are
tested against. Computes in float64 when given float64 inputs (at least float32 otherwise).
"""

from __future__ import annotations

import torch

from .validation import check_call, prepare_mask, prepare_u, resolve_codes


def text_token_mask(N: int, n_text: int, text_first: bool, device=None) -> torch.Tensor:
    """``(N,)`` bool: True where token ``i`` is a text token (first ``n_text`` or last ``n_text`` tokens)."""
    idx = torch.arange(N, device=device)
    return idx < n_text if text_first else idx >= N - n_text


def masked_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row whose every score is ``-inf`` (every key masked) is 0, as in
    ``F.scaled_dot_product_attention``."""
    every_key_masked = scores.amax(dim=-1, keepdim=True) == float("-inf")
    return scores.softmax(dim=-1).masked_fill(every_key_masked, 0.0)


def identity_map(scores: torch.Tensor, mode: str, n_text: int, text_first: bool) -> torch.Tensor:
    """The perturbed map ``P`` for ``scores`` of shape ``(..., N, N)`` (already scaled, mask bias included).

    ``joint``: the identity over the whole sequence (the mask does not apply: a query's own value is taken as
    is). ``image``: softmax of the scores with every image-image pair (i != j) masked out, so an image query sees
    its own key and every (unmasked) text key; text rows equal ``A``.
    """
    N = scores.shape[-1]
    if mode == "joint":
        return torch.eye(N, dtype=scores.dtype, device=scores.device).expand_as(scores)
    is_text = text_token_mask(N, n_text, text_first, scores.device)
    image_pair = ~is_text[:, None] & ~is_text[None, :]
    off_diagonal = ~torch.eye(N, dtype=torch.bool, device=scores.device)
    masked = scores.masked_fill(image_pair & off_diagonal, float("-inf"))
    return masked_softmax(masked)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u, *,
    layout: str = "bhnd", mode: str = "joint", n_text: int = 0, text_first: bool = False, scale: float | None = None,
    plan=None, attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[b, h] = ((1 - u[b, h]) * A + u[b, h] * P) @ v[b, h]`` with the maps materialised.

    Same arguments and semantics as :func:`headpag.kernels.perturbed_attention` (minus ``backend``): ``attn_mask``
    enters ``A`` and the image-mode ``P`` as an additive bias on the scores.
    Returns a tensor with q's layout, shape and dtype.
    """
    shape, scale = check_call(q, k, v, layout, mode, n_text, text_first, scale)
    u_t, u_host = prepare_u(u, shape.B, shape.H, q.device)
    bias = prepare_mask(attn_mask, shape, q)
    if plan is not None:
        resolve_codes(u_t, plan, u_host)  # checks the plan against u; the materialised maps need no codes

    out_dtype = q.dtype
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.to(compute_dtype)
    attention = masked_softmax(scores)
    perturbed = identity_map(scores, mode, n_text, text_first)
    w = u_t.to(compute_dtype)[:, :, None, None]
    out = ((1 - w) * attention + w * perturbed) @ v
    if layout == "bnhd":
        out = out.transpose(1, 2)
    return out.to(out_dtype).contiguous()
