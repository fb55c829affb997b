"""Random q, k, v for the kernel tests, in either layout and in the memory layouts diffusers produces."""

from __future__ import annotations

import torch

# How q, k, v are laid out in memory (the logical shape is always the layout's):
#   contiguous  a fresh tensor of the layout's shape
#   permuted    a transpose of the *other* layout's buffer (bhnd from (B, N, H, D), bnhd from (B, H, N, D))
#   packed      views into one fused (B, N, 3, H, D) projection buffer, as diffusers' fused qkv produces
#   strided     every other element of a (..., 2 * D) buffer: the head dim itself is strided
QKV_VARIANTS = ("contiguous", "permuted", "packed", "strided")


def _one_layout(t_bhnd_or_bnhd: torch.Tensor, have: str, want: str) -> torch.Tensor:
    return t_bhnd_or_bnhd if have == want else t_bhnd_or_bnhd.transpose(1, 2)


def make_qkv(
    B: int,
    H: int,
    N: int,
    D: int,
    *,
    layout: str = "bhnd",
    variant: str = "contiguous",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v of logical shape ``(B, H, N, D)`` (``layout="bhnd"``) or ``(B, N, H, D)`` (``"bnhd"``).

    Values are standard normal, drawn in float32 with a fixed seed and then cast, so one seed gives the same
    numbers (up to rounding) in every dtype and memory variant.
    """
    if layout not in ("bhnd", "bnhd"):
        raise ValueError(layout)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    if variant == "contiguous":
        shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
        q, k, v = (randn(*shape) for _ in range(3))
    elif variant == "permuted":
        if layout == "bhnd":
            q, k, v = (randn(B, N, H, D).transpose(1, 2) for _ in range(3))
        else:
            q, k, v = (randn(B, H, N, D).transpose(1, 2) for _ in range(3))
    elif variant == "packed":
        q, k, v = (_one_layout(t, "bnhd", layout) for t in randn(B, N, 3, H, D).unbind(2))
    elif variant == "strided":
        shape = (B, H, N, 2 * D) if layout == "bhnd" else (B, N, H, 2 * D)
        q, k, v = (randn(*shape)[..., ::2] for _ in range(3))
    else:
        raise ValueError(f"unknown variant {variant!r}; one of {QKV_VARIANTS}")

    expected = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
    for t in (q, k, v):
        assert tuple(t.shape) == expected, (t.shape, expected)
        # A one-element dim makes any stride "contiguous"; otherwise the variant must really be a strided view.
        if variant != "contiguous" and min(B, H, N, D) > 1:
            assert not t.is_contiguous(), variant
    return q, k, v


def to_bhnd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of ``t`` in (B, H, N, D) order."""
    return t if layout == "bhnd" else t.transpose(1, 2)
