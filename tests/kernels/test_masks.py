"""Attention masks (``attn_mask``): the Triton kernel (interpreter) and the torch path against the float64
materialised-map oracle, and the oracle itself against ``F.scaled_dot_product_attention``.

The masks are the ones diffusers' processors pass: text padding over the keys (Qwen-Image, Z-Image, Lumina2:
bool ``(B, N)`` or ``(B, 1, 1, N)``), Chroma's query x key outer product (padded text rows see no key at all), an
additive float bias, and a per-head bias. Padding sits inside the text block and straddles a 16-key block edge.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headpag.kernels import perturbed_attention, reference_attention
from support.qkv import make_qkv, to_bhnd
from support.tolerances import assert_matches

B, H, N, D = 2, 3, 23, 40
N_TEXT = 9  # text first: tokens [0, 9); row 0 pads its last 4 text tokens, row 1 its last 1


def _text_padding(text_first: bool) -> torch.Tensor:
    """bool (B, N): True on the real tokens, False on each row's padded text tokens."""
    keep = torch.ones(B, N, dtype=torch.bool)
    for b, pad in enumerate((4, 1)):
        lo = N_TEXT - pad if text_first else N - pad
        keep[b, lo:lo + pad] = False
    return keep


def _mask(kind: str, text_first: bool) -> torch.Tensor:
    keep = _text_padding(text_first)
    gen = torch.Generator().manual_seed(7)
    if kind == "key-2d":
        return keep
    if kind == "key-4d":
        return keep[:, None, None, :]
    if kind == "pair-outer":  # Chroma: a padded query row sees no key (SDPA gives it 0)
        return (keep[:, None, :] & keep[:, :, None])[:, None]
    if kind == "float-key-bias":
        return torch.randn(B, 1, 1, N, generator=gen).masked_fill(~keep[:, None, None, :], float("-inf"))
    if kind == "float-per-head":
        return torch.randn(1, H, N, N, generator=gen)
    raise ValueError(kind)


MASK_KINDS = ("key-2d", "key-4d", "pair-outer", "float-key-bias", "float-per-head")
MIXED_U = torch.tensor([[0.0, 1.0, 0.5], [0.25, 0.0, 1.0]])
BACKEND_DTYPES = [("triton", torch.float32), ("triton", torch.float16), ("torch", torch.float32),
                  ("torch", torch.float16), ("torch", torch.bfloat16), ("torch", torch.float64)]


def _reference64(q, k, v, u, mask, *, layout, mode, text_first):
    q64, k64, v64 = (to_bhnd(t, layout).to(torch.float64) for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, u, mode=mode, n_text=N_TEXT, text_first=text_first, attn_mask=mask)
    return ref if layout == "bhnd" else ref.transpose(1, 2)


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("text_first", [True, False], ids=["textfirst", "textlast"])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
def test_masked_attention_matches_the_oracle(backend, dtype, kind, text_first, mode):
    layout = "bnhd" if kind != "key-2d" else "bhnd"
    q, k, v = make_qkv(B, H, N, D, layout=layout, variant="permuted", dtype=dtype, seed=len(kind))
    mask = _mask(kind, text_first)
    out = perturbed_attention(q, k, v, MIXED_U, layout=layout, mode=mode, n_text=N_TEXT, text_first=text_first,
                              backend=backend, attn_mask=mask)
    ref = _reference64(q, k, v, MIXED_U, mask, layout=layout, mode=mode, text_first=text_first)
    assert torch.isfinite(out).all()
    assert_matches(out, ref, dtype, msg=f"{backend} {dtype} {kind} {mode} text_first={text_first}")
    # The mask is really applied: without it the output differs.
    unmasked = _reference64(q, k, v, MIXED_U, None, layout=layout, mode=mode, text_first=text_first)
    assert (ref - unmasked).abs().max() > 1e-2


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_the_oracle_with_u_0_is_sdpa_with_the_mask(kind):
    """The oracle's masked map ``A`` is SDPA's: padded rows of an outer-product mask give 0, as in SDPA."""
    q, k, v = make_qkv(B, H, N, D, dtype=torch.float64, seed=2)
    mask = _mask(kind, True)
    sdpa_mask = mask[:, None, None, :] if kind == "key-2d" else mask
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask.to(torch.float64) if mask.is_floating_point() else sdpa_mask)
    got = reference_attention(q, k, v, 0.0, attn_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_joint_identity_ignores_the_mask(backend):
    """``u == 1`` in joint mode returns each query's own value, masked or not (diffusers' PAG identity)."""
    q, k, v = make_qkv(B, H, N, D, seed=3)
    out = perturbed_attention(q, k, v, 1.0, backend=backend, attn_mask=_mask("pair-outer", True))
    assert torch.equal(out, v)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_image_mode_padded_text_keys_leave_the_perturbed_rows(backend):
    """Image mode, u == 1: an image query's perturbed softmax runs over the unpadded text keys and its own key
    only; recomputed here by hand for one (row, head)."""
    q, k, v = make_qkv(B, H, N, D, dtype=torch.float32, seed=4)
    keep = _text_padding(True)
    out = perturbed_attention(q, k, v, 1.0, mode="image", n_text=N_TEXT, text_first=True, backend=backend, attn_mask=keep)
    b, h, i = 0, 1, 15  # an image query
    keys = [j for j in range(N_TEXT) if keep[b, j]] + [i]
    s = q[b, h, i].double() @ k[b, h, keys].double().T * D ** -0.5
    expected = s.softmax(-1) @ v[b, h, keys].double()
    torch.testing.assert_close(out[b, h, i].double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_an_all_true_mask_equals_no_mask(backend):
    q, k, v = make_qkv(B, H, N, D, seed=5)
    kw = dict(mode="image", n_text=N_TEXT, text_first=False, backend=backend)
    masked = perturbed_attention(q, k, v, MIXED_U, attn_mask=torch.ones(B, N, dtype=torch.bool), **kw)
    torch.testing.assert_close(masked, perturbed_attention(q, k, v, MIXED_U, **kw), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mask, error, match", [
    (torch.ones(B, N, dtype=torch.int64), TypeError, r"attn_mask must be a bool tensor .* got dtype torch.int64"),
    (torch.ones(B, N - 1, dtype=torch.bool), ValueError, r"attn_mask must broadcast to \(B, H, N, N\) = \(2, 3, 23, 23\)"),
    (torch.ones(B, 2, N, N, dtype=torch.bool), ValueError, r"attn_mask must broadcast to"),
    (torch.ones(1, 1, N, 1, dtype=torch.bool), ValueError, r"one entry per key"),
    ([[True] * N] * B, TypeError, r"attn_mask must be a torch.Tensor or None, got list"),
])
def test_bad_masks_are_refused(mask, error, match):
    q, k, v = make_qkv(B, H, N, D, seed=6)
    for fn in (perturbed_attention, reference_attention):
        with pytest.raises(error, match=match):
            fn(q, k, v, 0.5, attn_mask=mask)


def test_masked_kernel_is_traced_by_flop_counter_on_meta():
    """The custom op takes the mask on the meta device (the full-size FLOP benchmarks use it)."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.empty(B, H, N, D, device="meta") for _ in range(3))
    mask = torch.empty(B, N, dtype=torch.bool, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = perturbed_attention(q, k, v, torch.zeros(B, H, device="meta"), plan=0, attn_mask=mask)
    assert out.shape == q.shape
    assert counter.get_total_flops() == B * H * 4 * N * N * D
