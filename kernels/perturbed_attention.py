"""Public entry point ``perturbed_attention``: validation, backend choice, custom-op registration, FLOPs.

The op ``torch.ops.headpag.perturbed_attention`` is registered with a fake implementation (output shaped
like q) and a FLOP formula driven by the host-side codes (PLAIN / SOFT / IDENTITY per (row, head)), so
``torch.compile`` traces it without graph breaks and ``FlopCounterMode`` on the meta device sees its cost.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .flops import attention_flops
from .torch_path import torch_perturbed_attention
from .validation import check_backend, check_call, given_codes, prepare_mask, prepare_u, resolve_codes

try:
    from . import triton_kernel
except ImportError:  # triton is optional: the torch path serves
    triton_kernel = None

HAS_TRITON = triton_kernel is not None


def perturbed_attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    codes: list[int],
    layout: str,
    mode: str,
    n_text: int,
    text_first: bool,
    scale: float,
    backend: str,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The body of ``torch.ops.headpag.perturbed_attention`` (checked arguments; ``codes`` flat row-major), callable
    outside the dispatcher: what a counter of dispatched operators runs to see the ops inside the custom op."""
    kwargs = dict(layout=layout, mode=mode, n_text=n_text, text_first=text_first, scale=scale, bias=bias)
    if backend == "triton":
        return triton_kernel.triton_perturbed_attention(q, k, v, u, **kwargs)
    return torch_perturbed_attention(q, k, v, u, codes, **kwargs)


_perturbed_attention_op = torch.library.custom_op("headpag::perturbed_attention", perturbed_attention_impl,
                                                  mutates_args=())


@_perturbed_attention_op.register_fake
def _perturbed_attention_fake(q, k, v, u, codes, layout, mode, n_text, text_first, scale, backend, bias=None):
    return q.new_empty(q.shape)


@register_flop_formula(torch.ops.headpag.perturbed_attention)
def _perturbed_attention_flops(q_shape, k_shape, v_shape, u_shape, codes, layout, mode, n_text, text_first, scale, backend, *args, out_shape=None, **kwargs) -> int:
    N, D = (q_shape[2], q_shape[3]) if layout == "bhnd" else (q_shape[1], q_shape[3])
    return attention_flops(codes, N, D, mode, n_text, backend)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors when triton is importable, else ``"torch"``."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if HAS_TRITON and q.device.type == "cuda" else "torch"
    if backend == "triton" and not HAS_TRITON:
        raise ValueError("backend='triton' needs the triton package (pip install 'headpag[triton]'); use backend='torch' or 'auto'")
    if backend == "triton":
        triton_kernel.check_interpreter_dtype(q.dtype)  # bf16 under TRITON_INTERPRET=1: refused, not wrong
    return backend


def _check_call(q, k, v, layout, mode, n_text, text_first, scale, backend):
    """Checks everything but ``u`` and ``plan``; returns (logical shape, softmax scale, resolved backend, n_text as
    a Python int)."""
    return (*check_call(q, k, v, layout, mode, n_text, text_first, scale), resolve_backend(backend, q), int(n_text))


def perturbed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u, *,
    layout: str = "bhnd", mode: str = "joint", n_text: int = 0, text_first: bool = False, scale: float | None = None,
    backend: str = "auto", plan=None, attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention whose map, per (batch row, head), is ``(1 - u) * A + u * P``: ``A`` the softmax attention map
    ``softmax(scale * q k^T)``, ``P`` the perturbed map of ``mode`` (below), ``u`` that pair's coefficient.

    Args:
        q, k, v: ``(B, H, N, D)`` for ``layout="bhnd"``, ``(B, N, H, D)`` for ``layout="bnhd"``; any strides.
            One shape, dtype (float16, bfloat16, float32; float64 on the torch path) and device.
        u: coefficients in [0, 1]: a scalar, ``(H,)`` or ``(B, H)``; a tensor or host-side numbers.
        mode: ``"joint"`` (``P = I`` over the whole sequence) or ``"image"`` (``P`` = softmax with every
            image-image pair but the diagonal masked; text rows keep ``A``).
        n_text, text_first: for ``mode="image"``, the number of text tokens and whether they come first.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (triton for CUDA tensors when importable).
        plan: optional ``(B, H)``-broadcastable codes (0: ``u == 0``, 1: ``0 < u < 1``, 2: ``u == 1``) that
            say which work is done; required on the meta device, checked against ``u`` elsewhere. Under
            ``torch.compile`` pass it as Python ints (a tensor plan must be read: a graph break).
        attn_mask: as in ``F.scaled_dot_product_attention``, always query x key ``(B, H, N, N)``-broadcastable
            whatever the layout (a 2-D mask is ``(B, N)`` over the keys): bool (True: attend) or a floating
            bias added to the scaled scores. It enters ``A`` and the image-mode ``P``; the joint identity returns
            each query's own value regardless. A row whose every key is masked gets 0 from ``A``, as in SDPA.

    Returns:
        A tensor with q's layout, shape and dtype (contiguous).
    """
    shape, scale, backend, n_text = _check_call(q, k, v, layout, mode, n_text, text_first, scale, backend)
    u_t, u_host = prepare_u(u, shape.B, shape.H, q.device)
    codes = resolve_codes(u_t, plan, u_host)
    return torch.ops.headpag.perturbed_attention(
        q, k, v, u_t, codes, layout, mode, n_text, text_first, scale, backend, prepare_mask(attn_mask, shape, q)
    )


def perturbed_attention_from_plan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor, *, plan,
    layout: str = "bhnd", mode: str = "joint", n_text: int = 0, text_first: bool = False, scale: float | None = None,
    backend: str = "auto", attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`perturbed_attention` for callers that built ``u`` and ``plan`` together from checked values
    (headpag's guided attention layers): ``u`` is never read, so a call never waits for the device.

    ``u`` must be a float32 ``(B, H)`` tensor on q's device and ``plan`` its codes (a Python int or nested
    lists of ints broadcastable to ``(B, H)``); shapes, dtype, device and codes are checked (host metadata only),
    the agreement of ``plan`` with ``u``'s values is the caller's promise.
    """
    shape, scale, backend, n_text = _check_call(q, k, v, layout, mode, n_text, text_first, scale, backend)
    if not isinstance(u, torch.Tensor) or u.dtype != torch.float32 or tuple(u.shape) != (shape.B, shape.H) or u.device != q.device:
        got = f"{tuple(u.shape)} {u.dtype} on {u.device}" if isinstance(u, torch.Tensor) else repr(u)
        raise ValueError(f"u must be a float32 (B, H) = ({shape.B}, {shape.H}) tensor on {q.device}, got {got}")
    if plan is None:
        raise ValueError("plan is required: perturbed_attention_from_plan never reads u (use perturbed_attention)")
    codes = given_codes(plan, shape.B, shape.H)
    return torch.ops.headpag.perturbed_attention(
        q, k, v, u.contiguous(), codes, layout, mode, n_text, text_first, scale, backend,
        prepare_mask(attn_mask, shape, q),
    )
