"""Argument checking and normalisation shared by every backend of ``perturbed_attention``.

Everything here runs on the host and raises ``ValueError`` / ``TypeError`` naming the argument and the
allowed values; nothing is clamped.

``u`` takes one path: :func:`prepare_u` makes it a checked float32 ``(B, H)`` tensor (plus a host copy to read), and
:func:`resolve_codes` gives the per-(row, head) codes PLAIN / SOFT / IDENTITY (``constants.py``) of the call,
from ``u`` or from the caller's ``plan=`` checked against ``u``. The codes decide the work done, so the fake
implementation and the FLOP formula use them on the meta device, where ``u``'s values cannot be read.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import NamedTuple, Sequence, Union

import torch

from .constants import CODES, IDENTITY, MODES, PLAIN, SOFT

LAYOUTS = ("bhnd", "bnhd")
BACKENDS = ("auto", "triton", "torch")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

UType = Union[torch.Tensor, Real, Sequence]
PlanType = Union[torch.Tensor, int, Sequence]
_CODE_SET = frozenset(CODES)


class AttentionShape(NamedTuple):
    """Logical sizes of one call: batch rows, heads, sequence length, head dim."""

    B: int
    H: int
    N: int
    D: int


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> AttentionShape:
    """Checks q, k, v agree in layout, shape, dtype and device; returns the logical sizes."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            dims = "(B, H, N, D)" if layout == "bhnd" else "(B, N, H, D)"
            raise ValueError(f"{name} must be 4-D {dims} for layout={layout!r}, got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}.dtype must be one of {[str(d) for d in DTYPES]}, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all of q, k, v must share a device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype {t.dtype} differs from q.dtype {q.dtype}; q, k, v must share a dtype")
        if t.shape != q.shape:
            what = "sequence length" if t.shape[_seq_dim(layout)] != q.shape[_seq_dim(layout)] else "shape"
            raise ValueError(
                f"{name} {what} differs from q: {tuple(t.shape)} vs {tuple(q.shape)}; the identity map needs "
                f"q, k, v of one shape"
            )
    B, H, N, D = logical_shape(q, layout)
    if min(B, H, N, D) < 1:
        raise ValueError(f"q has an empty dimension: shape {tuple(q.shape)}")
    if any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled():
        raise ValueError(
            "perturbed_attention is inference only: q, k or v requires grad. Call it under torch.no_grad() "
            "or torch.inference_mode(), or pass detached tensors"
        )
    return AttentionShape(B, H, N, D)


def check_call(q, k, v, layout: str, mode: str, n_text: int, text_first: bool, scale) -> tuple[AttentionShape, float]:
    """Checks q, k, v and the keywords every entry point shares (all but ``u``, ``plan`` and ``backend``);
    returns the logical sizes and the softmax scale."""
    shape = check_qkv(q, k, v, layout)
    check_mode(mode, n_text, text_first, shape.N)
    return shape, check_scale(scale, shape.D)


def logical_shape(q: torch.Tensor, layout: str) -> AttentionShape:
    """``(B, H, N, D)`` of a tensor in ``layout`` ("bhnd" or "bnhd")."""
    if layout == "bhnd":
        B, H, N, D = q.shape
    else:
        B, N, H, D = q.shape
    return AttentionShape(B, H, N, D)


def _seq_dim(layout: str) -> int:
    return 2 if layout == "bhnd" else 1


def check_mode(mode: str, n_text: int, text_first: bool, N: int) -> None:
    """Checks the identity-map mode and, for ``mode="image"``, the text-token split."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(n_text, bool) or not isinstance(n_text, Integral):  # Python or numpy ints; callers take int(n_text)
        raise TypeError(f"n_text must be an int in [0, N={N}], got {n_text!r}")
    if not 0 <= n_text <= N:
        raise ValueError(f"n_text must be in [0, N={N}], got {n_text}")
    if not isinstance(text_first, bool):
        raise TypeError(f"text_first must be a bool, got {text_first!r}")


def check_scale(scale, D: int) -> float:
    """Returns the softmax scale; ``None`` means ``D ** -0.5``."""
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a positive finite number or None, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale}")
    return scale


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def prepare_u(u: UType, B: int, H: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks ``u`` and returns ``(u_t, u_host)``: ``u_t`` a contiguous float32 ``(B, H)`` tensor on ``device``,
    ``u_host`` a float64 ``(B, H)`` CPU copy to read (``None`` on the meta device and under ``torch.compile``,
    where values cannot be read).

    ``u`` may be a scalar, an ``(H,)`` or ``(B, H)`` tensor or nested sequence (anything broadcastable to
    ``(B, H)``). Values must lie in [0, 1]; NaN is rejected. On the meta device the values are not checked.
    Device synchronisation: a ``u`` on an accelerator is read once (one copy to the host); host-side ``u`` reaches
    an accelerator by a fill (a scalar) or a non-blocking copy from pinned memory, neither of which waits for it.
    """
    if isinstance(u, bool):
        raise TypeError("u must be a number in [0, 1] or a tensor/sequence of them, got a bool")
    if isinstance(u, torch.Tensor):
        if u.dtype.is_complex or u.dtype == torch.bool:
            raise TypeError(f"u must be a real floating or integer tensor, got dtype {u.dtype}")
        u_t = u
    else:
        try:
            u_t = torch.as_tensor(u, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"u must be a number in [0, 1] or a tensor/sequence of them, got {u!r}") from err
    try:
        u_t = torch.broadcast_to(u_t, (B, H))
    except RuntimeError as err:
        raise ValueError(f"u must broadcast to (B, H) = ({B}, {H}), e.g. shape (), ({H},) or ({B}, {H}); got shape {tuple(u_t.shape)}") from err
    device = torch.device(device)
    if u_t.device.type == "meta" and device.type != "meta":
        raise ValueError(f"u is on the meta device but q, k, v are on {device}: u's values are needed there; pass u "
                         f"on {device} (or as numbers), or q, k, v on the meta device too")
    host = None
    if u_t.device.type != "meta" and not torch.compiler.is_compiling():
        host = u_t.detach().to("cpu", torch.float64)
        if torch.isnan(host).any():
            raise ValueError("u must be in [0, 1], got NaN")
        lo, hi = float(host.min()), float(host.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"u must be in [0, 1], got values in [{lo}, {hi}]")
    if u_t.device.type != "cpu" or device.type in ("cpu", "meta") or torch.compiler.is_compiling():
        return u_t.to(device=device, dtype=torch.float32).contiguous(), host
    if not isinstance(u, torch.Tensor) and bool((host == host[0, 0]).all()):
        return torch.full((B, H), float(host[0, 0]), dtype=torch.float32, device=device), host
    staged = u_t.to(torch.float32).contiguous().pin_memory()
    return staged.to(device, non_blocking=True), host


def codes_from_u(u: torch.Tensor) -> torch.Tensor:
    """The codes ``u`` implies: an int8 ``(B, H)`` CPU tensor of PLAIN / SOFT / IDENTITY for a readable
    ``(B, H)`` coefficient tensor."""
    u = u.detach().to("cpu", torch.float64)
    codes = torch.full(u.shape, SOFT, dtype=torch.int8)
    codes[u == 0] = PLAIN
    codes[u == 1] = IDENTITY
    return codes


def _nested_ints(value) -> tuple[tuple[int, ...], list] | None:
    """Shape and row-major flat values of a Python int or a rectangular nested list/tuple of them, using no
    torch ops (so ``torch.compile`` sees constants); ``None`` for anything else (tensors, arrays, floats, ...)."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        return (), [value]
    if not isinstance(value, (list, tuple)):
        return None
    parts = [_nested_ints(p) for p in value]
    if any(p is None for p in parts):
        return None
    shapes = {shape for shape, _ in parts}
    if len(shapes) > 1:
        raise ValueError(f"plan must be a rectangular nested sequence of codes {{0, 1, 2}}, got {value!r}")
    inner = shapes.pop() if shapes else ()
    return (len(value), *inner), [x for _, flat in parts for x in flat]


def _row_codes(plan, B: int, H: int) -> list[int] | None:
    """The flat codes of a plan given as ``B`` rows of ``H`` Python ints in ``CODES`` (what headpag's guided layers
    pass on every call), read in one pass; ``None`` for any other plan (:func:`given_codes` then reads it in full)."""
    if not isinstance(plan, (list, tuple)) or len(plan) != B:
        return None
    if not all(isinstance(row, (list, tuple)) and len(row) == H for row in plan):
        return None
    flat = [c for row in plan for c in row]
    if set(map(type, flat)) == {int} and _CODE_SET.issuperset(flat):
        return flat
    return None


def given_codes(plan: PlanType, B: int, H: int) -> list[int]:
    """The caller-given codes (the ``plan=`` argument) as a flat row-major list of ``B * H`` PLAIN / SOFT /
    IDENTITY codes; ``plan`` broadcasts to ``(B, H)`` like ``u``.

    Python ints and nested lists/tuples are read in pure Python, so constant codes trace under
    ``torch.compile(fullgraph=True)`` without graph breaks; a tensor (or array) must be read to the host first,
    which ``torch.compile`` cannot do without a graph break.
    """
    flat = _row_codes(plan, B, H)
    if flat is not None:
        return flat
    nested = _nested_ints(plan)
    if nested is None:
        try:
            t = torch.as_tensor(plan)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"plan must be a tensor or nested sequence of codes {{0, 1, 2}}, got {plan!r}") from err
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise TypeError(f"plan must hold integer codes {{0: plain, 1: soft, 2: identity}}, got dtype {t.dtype}")
        nested = _nested_ints(t.tolist())
    shape, flat = nested
    if len(shape) > 2 or any(have not in (1, want) for have, want in zip(reversed(shape), (H, B))):
        raise ValueError(f"plan must broadcast to (B, H) = ({B}, {H}), got shape {shape}")
    rows, cols = (1,) * (2 - len(shape)) + shape
    codes = [int(flat[(b if rows != 1 else 0) * cols + (h if cols != 1 else 0)]) for b in range(B) for h in range(H)]
    if any(c not in CODES for c in codes):
        raise ValueError(f"plan codes must be in {{0: plain, 1: soft, 2: identity}}, got {sorted(set(codes))}")
    return codes


def resolve_codes(u_t: torch.Tensor, plan: PlanType | None, u_host: torch.Tensor | None = None) -> list[int]:
    """The codes of one call as a flat row-major list of ``B * H`` PLAIN / SOFT / IDENTITY codes: the given
    ``plan`` (checked against ``u``'s values where they can be read) or, without one, the codes ``u`` implies.

    ``u_t`` is the ``(B, H)`` coefficient tensor and ``u_host`` its host copy from :func:`prepare_u`, read instead of
    ``u_t`` when given (reading a CUDA ``u_t`` would synchronise). A plan must be given when ``u_t`` lives on the
    meta device. Under ``torch.compile`` pass the plan as Python ints: ``u`` is not read there (neither to derive the
    codes nor to check them).
    """
    B, H = u_t.shape
    # A call for the meta device works from the plan alone, also where u came as host numbers.
    readable = u_t if u_host is None or u_t.device.type == "meta" else u_host
    if plan is None:
        if readable.device.type == "meta":
            raise ValueError("plan is required when u is on the meta device (its values cannot be read)")
        return codes_from_u(readable).flatten().tolist()
    codes = given_codes(plan, B, H)
    if readable.device.type != "meta" and not torch.compiler.is_compiling():
        readable = readable.detach().to("cpu")  # one read: what follows indexes the host copy
        implied = codes_from_u(readable).flatten().tolist()
        if implied != codes:
            i = next(i for i, (a, c) in enumerate(zip(implied, codes)) if a != c)
            b, h = divmod(i, H)
            raise ValueError(
                f"plan contradicts u at (row, head) = {(b, h)}: plan says {codes[i]}, u = "
                f"{float(readable[b, h])} implies {implied[i]} (0: u == 0, 1: 0 < u < 1, 2: u == 1)"
            )
    return codes


def prepare_mask(attn_mask, shape: AttentionShape, q: torch.Tensor) -> torch.Tensor | None:
    """Checks ``attn_mask`` and returns it as a float32 additive score bias on q's device, 4-D ``(B or 1, H or 1,
    N or 1, N)`` (query x key, as in ``F.scaled_dot_product_attention`` in either layout), broadcast dims kept at
    size 1; ``None`` passes through.

    ``attn_mask`` follows ``F.scaled_dot_product_attention``: a bool tensor (True: the query may attend to the key)
    or a floating tensor added to the scaled scores, broadcastable to ``(B, H, N, N)``; a 2-D mask is ``(B, N)``
    over the keys (diffusers' convention). Values are not read (no device synchronisation).
    """
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be a bool tensor (True: attend) or a floating tensor added to the scores, "
                        f"got dtype {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    B, H, N, _ = shape
    mask = attn_mask
    if mask.dim() == 2 and mask.shape[0] in (1, B) and mask.shape[1] == N:
        mask = mask[:, None, None, :]
    if mask.dim() > 4 or mask.dim() < 1:
        raise ValueError(f"attn_mask must broadcast to (B, H, N, N) = ({B}, {H}, {N}, {N}), got shape {tuple(attn_mask.shape)}")
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if any(have not in (1, want) for have, want in zip(mask.shape, (B, H, N, N))) or mask.shape[3] != N:
        raise ValueError(f"attn_mask must broadcast to (B, H, N, N) = ({B}, {H}, {N}, {N}) with one entry per key, "
                         f"got shape {tuple(attn_mask.shape)}")
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return bias.masked_fill_(~mask, float("-inf"))
    return mask.to(torch.float32)
