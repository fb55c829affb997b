"""Evidence that skipped work is really skipped: the kernel's COUNT_VISITS debug output (key blocks visited per
program) against counts derived here from N, n_text, text_first and the interpreter's block sizes.

- joint mode: a u == 1 pair visits no key block; every other pair visits all ceil(N / BLOCK_N).
- image mode, u == 1: a query block holding only image rows visits just the key blocks that overlap the text
  span; a block holding any text row (text rows keep A) visits all of them. u < 1 visits all.
"""

from __future__ import annotations

import math

import pytest
import torch

from headpag.kernels import reference_attention
from headpag.kernels.configs import INTERPRETER_CONFIG
from headpag.kernels.triton_kernel import interpreting, triton_perturbed_attention
from headpag.kernels.validation import prepare_u
from support.qkv import make_qkv
from support.tolerances import assert_matches

BLOCK_M = INTERPRETER_CONFIG.BLOCK_M
BLOCK_N = INTERPRETER_CONFIG.BLOCK_N


def text_range(N: int, n_text: int, text_first: bool) -> range:
    return range(0, n_text) if text_first else range(N - n_text, N)


def expected_visits(N: int, u: torch.Tensor, mode: str, n_text: int = 0, text_first: bool = False) -> torch.Tensor:
    """(B, H, query blocks) key-block counts, computed from the tiling alone."""
    n_key_blocks = math.ceil(N / BLOCK_N)
    n_query_blocks = math.ceil(N / BLOCK_M)
    text = set(text_range(N, n_text, text_first))
    key_blocks_with_text = sum(
        1 for j in range(n_key_blocks) if text & set(range(j * BLOCK_N, min((j + 1) * BLOCK_N, N)))
    )
    B, H = u.shape
    out = torch.empty(B, H, n_query_blocks, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for m in range(n_query_blocks):
                rows = set(range(m * BLOCK_M, min((m + 1) * BLOCK_M, N)))
                if float(u[b, h]) < 1:
                    out[b, h, m] = n_key_blocks
                elif mode == "joint":
                    out[b, h, m] = 0
                elif rows & text:
                    out[b, h, m] = n_key_blocks
                else:
                    out[b, h, m] = key_blocks_with_text
    return out


def run(q, k, v, u, *, mode, n_text=0, text_first=False, layout="bhnd"):
    B, H = (q.shape[0], q.shape[1]) if layout == "bhnd" else (q.shape[0], q.shape[2])
    D = q.shape[-1]
    u_t, _ = prepare_u(u, B, H, q.device)
    out, visits = triton_perturbed_attention(
        q, k, v, u_t, layout=layout, mode=mode, n_text=n_text, text_first=text_first, scale=D**-0.5, count_visits=True
    )
    ref = reference_attention(
        q.double(), k.double(), v.double(), u_t, layout=layout, mode=mode, n_text=n_text, text_first=text_first
    )
    assert_matches(out, ref, q.dtype)
    return u_t, visits


def test_interpreter_blocks_are_16():
    # The counts below assume the interpreter (COUNT_VISITS is interpreter-only) and its fixed tiles; a change
    # there must be a conscious one.
    assert interpreting()
    assert (BLOCK_M, BLOCK_N) == (16, 16)


@pytest.mark.parametrize("N", [1, 16, 17, 37, 50])
def test_joint_identity_pairs_visit_no_key_block(N):
    B, H, D = 2, 3, 32
    q, k, v = make_qkv(B, H, N, D, seed=N)
    u = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.25, 1.0]])
    u_t, visits = run(q, k, v, u, mode="joint")
    assert visits.dtype == torch.int32
    assert visits.shape == (B, H, math.ceil(N / BLOCK_M))
    assert torch.equal(visits, expected_visits(N, u_t, "joint"))
    # Spelled out: identity pairs 0, the others every key block.
    assert (visits[u == 1] == 0).all()
    assert (visits[u < 1] == math.ceil(N / BLOCK_N)).all()


def test_joint_identity_pairs_never_read_q_or_k():
    # Poison q and k of the identity pairs: had q k^T been formed there, NaN would reach the output.
    B, H, N, D = 1, 3, 37, 40
    q, k, v = make_qkv(B, H, N, D, layout="bnhd", seed=1)
    u = torch.tensor([[1.0, 0.0, 1.0]])
    for t in (q, k):
        t[:, :, 0] = float("nan")
        t[:, :, 2] = float("nan")
    u_t, _ = prepare_u(u, B, H, q.device)
    out, visits = triton_perturbed_attention(
        q, k, v, u_t, layout="bnhd", mode="joint", n_text=0, text_first=False, scale=D**-0.5, count_visits=True
    )
    assert torch.equal(out[:, :, [0, 2]], v[:, :, [0, 2]])
    assert not out.isnan().any()
    assert visits[0].tolist() == [[0, 0, 0], [3, 3, 3], [0, 0, 0]]


@pytest.mark.parametrize(
    "N, n_text, text_first",
    [
        (37, 5, True),  # text in block 0; blocks 1-2 pure image -> visit key block 0 only
        (37, 5, False),  # text in the last (partial) block
        (37, 20, False),  # text span [17, 37) crosses a block edge: 2 key blocks
        (50, 16, True),  # text exactly fills block 0
        (50, 17, False),  # text [33, 50): starts in block 2, ends in block 3
        (50, 0, True),  # no text: image blocks visit nothing
        (50, 0, False),  # no text, "text last": same (the span [N, N) is empty)
        (37, 37, True),  # all text: every block has text rows
        (23, 1, False),  # a single text token at the very end
    ],
)
def test_image_identity_pairs_visit_only_text_key_blocks(N, n_text, text_first):
    B, H, D = 1, 3, 32
    q, k, v = make_qkv(B, H, N, D, seed=N + n_text)
    u = torch.tensor([[1.0, 0.5, 0.0]])
    u_t, visits = run(q, k, v, u, mode="image", n_text=n_text, text_first=text_first)
    expected = expected_visits(N, u_t, "image", n_text, text_first)
    assert torch.equal(visits, expected), (visits.tolist(), expected.tolist())
    # The skip is real whenever some query block is pure image and some key block is text-free.
    all_blocks = math.ceil(N / BLOCK_N)
    text = set(text_range(N, n_text, text_first))
    pure_image_blocks = [m for m in range(math.ceil(N / BLOCK_M)) if not text & set(range(m * BLOCK_M, min(N, (m + 1) * BLOCK_M)))]
    for m in pure_image_blocks:
        assert visits[0, 0, m] < all_blocks or n_text == N
    assert (visits[0, 1:] == all_blocks).all()


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_image_visits_with_mixed_rows_and_heads(layout):
    B, H, N, D = 2, 2, 41, 64
    q, k, v = make_qkv(B, H, N, D, layout=layout, variant="permuted", dtype=torch.float16, seed=3)
    u = torch.tensor([[1.0, 0.0], [0.75, 1.0]])
    u_t, visits = run(q, k, v, u, mode="image", n_text=9, text_first=False, layout=layout)
    # text [32, 41) lies in key block 2; query blocks 0-1 are pure image, block 2 holds the text rows.
    assert visits.tolist() == [[[1, 1, 3], [3, 3, 3]], [[3, 3, 3], [1, 1, 3]]]
    assert torch.equal(visits, expected_visits(N, u_t, "image", 9, False))
