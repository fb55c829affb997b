"""The fused perturbed-attention forward kernel (Triton) and its launcher.

One launch covers every (batch row, head) pair (up to 65535 of them, CUDA's limit on grid axis 1; more are
launched in chunks of whole batch rows, :func:`launch_plan`); each program handles ``BLOCK_M`` query rows of one
pair and loads that pair's coefficient ``u``:

- joint mode: ``out = (1-u) * softmax(q k^T) v + u * v``. A pair with ``u == 1`` visits no key block (its
  loop bound is 0) and writes ``v``; ``u == 0`` never loads the identity term.
- image mode: a second online softmax over the text keys (and, folded in after the loop, the query's own
  key) runs in the same pass; text query rows keep ``A``. A block of image rows with ``u == 1`` visits only
  the key blocks that hold text tokens.

Scores are kept in base 2 (``scale * log2(e)`` folded into q k^T). With ``COUNT_VISITS`` the kernel writes
the number of key blocks each program visited, the evidence that skipped work is really skipped.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .configs import INTERPRETER_CONFIG, configs_for, padded_head_dim
from .validation import logical_shape

LOG2E = 1.0 / math.log(2.0)
LOG2E_TL = tl.constexpr(LOG2E)
#: Whether this process runs kernels in Triton's CPU interpreter; read once, as ``triton.jit`` decides at decoration
#: time too. The compile check (``aot.py``) runs without the variable, so it compiles the GPU form of the key loop.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _pair_base(X, b, h, stride_b, stride_h, STRIDE_MULTIPLE: tl.constexpr):
    """Pointer to token 0, head dim 0 of the (batch row ``b``, head ``h``) pair of tensor ``X`` (int64 offsets)."""
    return X + tl.multiple_of(b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h, STRIDE_MULTIPLE)


@triton.jit
def _row_tile(base, rows, stride_n, offs_d, STRIDE_MULTIPLE: tl.constexpr):
    """Pointers to the (len(rows), BLOCK_D) tile of tokens ``rows`` (stride ``stride_n``) and head dims ``offs_d``."""
    return base + tl.multiple_of(rows[:, None] * stride_n, [STRIDE_MULTIPLE, STRIDE_MULTIPLE]) + offs_d[None, :]


@triton.jit
def _softmax_step(s, v, state, INPUT_PRECISION: tl.constexpr):
    """One online-softmax update of ``state`` with base-2 scores ``s`` (BLOCK_M, BLOCK_N) against values ``v``
    (BLOCK_N, BLOCK_D). A softmax state is ``(m, l, acc)``: per query row the running maximum score, the running
    sum of exponentials and the (BLOCK_M, BLOCK_D) float32 accumulator of exponential-weighted values."""
    m, l, acc = state
    m_new = tl.maximum(m, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return m_new, l, acc


@triton.jit
def _score_bias(bias_base, rows, cols, stride_bias_m, stride_bias_n, row_ok, col_ok, BIAS_KIND: tl.constexpr):
    """The base-2 mask bias of the (rows, cols) score tile: ``BIAS_KIND`` 1 reads one bias per key (shared by every
    query row), 2 one per (query, key) pair. Out-of-range lanes read 0 (they are masked elsewhere)."""
    if BIAS_KIND == 1:
        bias = tl.load(bias_base + cols.to(tl.int64) * stride_bias_n, mask=col_ok, other=0.0)[None, :]
    else:
        bias = tl.load(bias_base + rows.to(tl.int64)[:, None] * stride_bias_m + cols.to(tl.int64)[None, :] * stride_bias_n,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return bias * LOG2E_TL


@triton.jit
def _own_key_bias(bias_base, rows, stride_bias_m, stride_bias_n, N, BIAS_KIND: tl.constexpr):
    """The base-2 mask bias of each query row's own key (the diagonal of the bias), a (BLOCK_M,) vector."""
    if BIAS_KIND == 1:
        step = stride_bias_n
    else:
        step = stride_bias_m + stride_bias_n
    return tl.load(bias_base + rows.to(tl.int64) * step, mask=rows < N, other=0.0) * LOG2E_TL


@triton.jit
def _key_block(
    start_n, q, k_base, v_base, stride_kn, stride_vn, N, qk_scale, full, pert,
    offs_n, offs_d, dim_ok, STRIDE_MULTIPLE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    text_lo, text_hi, FULL: tl.constexpr, PERTURBED: tl.constexpr,
    bias_base, offs_m, stride_bias_m, stride_bias_n, BIAS_KIND: tl.constexpr,
):
    """One key block of :func:`_attend_keys`: the keys ``[start_n, start_n + BLOCK_N)``. Returns both states."""
    cols = start_n + offs_n
    col_ok = cols < N
    kt = tl.load(k_base + tl.multiple_of(cols[None, :] * stride_kn, [STRIDE_MULTIPLE, STRIDE_MULTIPLE]) + offs_d[:, None],
                 mask=dim_ok[:, None] & col_ok[None, :], other=0.0)
    v = tl.load(_row_tile(v_base, cols, stride_vn, offs_d, STRIDE_MULTIPLE), mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
    if BIAS_KIND > 0:
        s += _score_bias(bias_base, offs_m, cols, stride_bias_m, stride_bias_n, offs_m < N, col_ok, BIAS_KIND)
    s = tl.where(col_ok[None, :], s, float("-inf"))
    if FULL:
        full = _softmax_step(s, v, full, INPUT_PRECISION)
    if PERTURBED:
        key_is_text = (cols >= text_lo) & (cols < text_hi)
        s2 = tl.where(key_is_text[None, :], s, float("-inf"))
        pert = _softmax_step(s2, v, pert, INPUT_PRECISION)
    return full, pert


@triton.jit
def _attend_keys(
    q, k_base, v_base, stride_kn, stride_vn, N, qk_scale, full, pert, visits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    lo, hi, text_lo, text_hi, FULL: tl.constexpr, PERTURBED: tl.constexpr,
    bias_base, offs_m, stride_bias_m, stride_bias_n, BIAS_KIND: tl.constexpr,
):
    """Visits the key blocks ``[lo, hi)`` (``lo`` block-aligned). ``FULL`` updates the softmax state ``full`` (every
    key: the map ``A``), ``PERTURBED`` the state ``pert`` (only the text keys ``[text_lo, text_hi)``: the image rows
    of ``P``). With ``BIAS_KIND`` > 0 the mask bias of the query rows ``offs_m`` is added to the scores. Returns
    both states and ``visits`` plus the number of key blocks visited."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # Padding lanes of the head dim need a mask only when the head dim is not a power of two.
    dim_ok = offs_d < (HEAD_DIM if HEAD_DIM < BLOCK_D else 2 * BLOCK_D)
    # Addresses are formed inside the loop (_key_block): loop-carried pointer tiles cost registers (and spill).
    if INTERPRETED:
        # The same blocks as the loop below. Triton's interpreter before 3.7 turns a runtime loop bound into an int
        # with int() of a one-element array, which numpy >= 2.4 refuses; a while loop only compares the bounds.
        start_n = lo
        while start_n < hi:
            full, pert = _key_block(
                start_n, q, k_base, v_base, stride_kn, stride_vn, N, qk_scale, full, pert, offs_n, offs_d, dim_ok,
                STRIDE_MULTIPLE, INPUT_PRECISION, text_lo, text_hi, FULL, PERTURBED,
                bias_base, offs_m, stride_bias_m, stride_bias_n, BIAS_KIND)
            visits += 1
            start_n += BLOCK_N
    else:
        # A for loop over runtime bounds: the form Triton's software pipeliner takes (cp.async one block ahead).
        for start_n in range(lo, hi, BLOCK_N):
            full, pert = _key_block(
                start_n, q, k_base, v_base, stride_kn, stride_vn, N, qk_scale, full, pert, offs_n, offs_d, dim_ok,
                STRIDE_MULTIPLE, INPUT_PRECISION, text_lo, text_hi, FULL, PERTURBED,
                bias_base, offs_m, stride_bias_m, stride_bias_n, BIAS_KIND)
            visits += 1
    return full, pert, visits


@triton.jit
def _add_own_key(state, q, k_own, v_own, qk_scale, own_bias):
    """``state`` with each query row's own key added (the diagonal entry of ``P``): ``k_own`` and ``v_own`` are the
    (BLOCK_M, BLOCK_D) key and value tiles at the query rows, ``own_bias`` the base-2 mask bias of those entries."""
    m, l, acc = state
    s_own = tl.sum(q.to(tl.float32) * k_own.to(tl.float32), 1) * qk_scale + own_bias
    m_new = tl.maximum(m, s_own)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key of the row masked
    alpha = tl.exp2(m - m_ref)
    p_own = tl.exp2(s_own - m_ref)
    return m_new, l * alpha + p_own, acc * alpha[:, None] + p_own[:, None] * v_own.to(tl.float32)


@triton.jit
def _normalized(state):
    """The rows of a softmax state's accumulator divided by their sums (rows that saw no key stay 0)."""
    m, l, acc = state
    return acc / tl.where(l == 0.0, 1.0, l)[:, None]


# The key blocks each program visits. A program owns BLOCK_M query rows of one (batch row, head) pair and that
# pair's u. In image mode "text" are the key blocks [text_start, text_end) that hold text tokens (none when
# n_text == 0) and "image-only" the blocks [0, text_start) and [text_end, N). FULL: the softmax over every key
# (the map A); PERTURBED: the softmax over the text keys, to which each image query's own key is added after the
# loops (the image rows of P; text rows of P equal A).
#
#   mode   u           query rows of the block   key blocks visited: softmaxes updated        after the loops
#   joint  u == 0      any                       [0, N): FULL                                 out = A v (v not loaded)
#   joint  0 < u < 1   any                       [0, N): FULL                                 out = (1-u) A v + u v
#   joint  u == 1      any                       none (hi = 0)                                out = v
#   image  u == 0      any                       text: FULL; image-only: FULL                 out = A v
#   image  0 < u < 1   any                       text: FULL + PERTURBED; image-only: FULL     own key into PERTURBED
#   image  u == 1      some text rows            text: FULL + PERTURBED; image-only: FULL     own key into PERTURBED
#   image  u == 1      image rows only           text: PERTURBED; image-only: none            own key into PERTURBED
#
# Image mode then writes (1-u) A v + u P v per row, with P v = A v on text rows.
@triton.jit
def _perturbed_attention_fwd(
    Q, K, V, U, O, VISITS, BIAS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_ub, stride_uh,
    stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    H, N, text_lo, text_hi, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IMAGE_MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
    STRIDE_MULTIPLE: tl.constexpr,
    BIAS_KIND: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    u = tl.load(U + b * stride_ub + h * stride_uh)

    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_tile_ok = (offs_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]

    q_base = _pair_base(Q, b, h, stride_qb, stride_qh, STRIDE_MULTIPLE)
    k_base = _pair_base(K, b, h, stride_kb, stride_kh, STRIDE_MULTIPLE)
    v_base = _pair_base(V, b, h, stride_vb, stride_vh, STRIDE_MULTIPLE)
    q = tl.load(_row_tile(q_base, offs_m, stride_qn, offs_d, STRIDE_MULTIPLE), mask=row_tile_ok, other=0.0)
    bias_base = BIAS + b.to(tl.int64) * stride_bias_b + h.to(tl.int64) * stride_bias_h

    # Softmax states (m, l, acc) (see _softmax_step): full over every key (A), pert over the keys P lets an image
    # query see (text keys, then its own key).
    full = (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, BLOCK_D], tl.float32))
    pert = (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, BLOCK_D], tl.float32))
    visits = 0

    if IMAGE_MODE:
        text_start = (text_lo // BLOCK_N) * BLOCK_N
        text_end = tl.minimum(tl.cdiv(text_hi, BLOCK_N) * BLOCK_N, N)
        if text_lo == text_hi:
            text_start = 0
            text_end = 0
        query_is_text = (offs_m >= text_lo) & (offs_m < text_hi)
        # (text_lo < text_hi: with no text tokens and text last, text_lo == text_hi == N and the last partial
        # block would otherwise count as holding text rows and run the full softmax.)
        block_has_text_rows = (m_start < text_hi) & (m_start + BLOCK_M > text_lo) & (text_lo < text_hi)
        need_full = (u < 1.0) | block_has_text_rows
        if u > 0.0:
            if need_full:
                full, pert, visits = _attend_keys(
                    q, k_base, v_base, stride_kn, stride_vn, N, qk_scale, full, pert, visits,
                    HEAD_DIM, BLOCK_D, BLOCK_N, STRIDE_MULTIPLE, INPUT_PRECISION,
                    bias_base=bias_base, offs_m=offs_m, stride_bias_m=stride_bias_m, stride_bias_n=stride_bias_n,
                    BIAS_KIND=BIAS_KIND, lo=text_start, hi=text_end, text_lo=text_lo, text_hi=text_hi, FULL=True, PERTURBED=True)
            else:
                full, pert, visits = _attend_keys(
                    q, k_base, v_base, stride_kn, stride_vn, N, qk_scale, full, pert, visits,
                    HEAD_DIM, BLOCK_D, BLOCK_N, STRIDE_MULTIPLE, INPUT_PRECISION,
                    bias_base=bias_base, offs_m=offs_m, stride_bias_m=stride_bias_m, stride_bias_n=stride_bias_n,
                    BIAS_KIND=BIAS_KIND, lo=text_start, hi=text_end, text_lo=text_lo, text_hi=text_hi, FULL=False, PERTURBED=True)
            k_own = tl.load(_row_tile(k_base, offs_m, stride_kn, offs_d, STRIDE_MULTIPLE), mask=row_tile_ok, other=0.0)
            v_own = tl.load(_row_tile(v_base, offs_m, stride_vn, offs_d, STRIDE_MULTIPLE), mask=row_tile_ok, other=0.0)
            own_bias = tl.zeros([BLOCK_M], tl.float32)
            if BIAS_KIND > 0:
                own_bias = _own_key_bias(bias_base, offs_m, stride_bias_m, stride_bias_n, N, BIAS_KIND)
            pert = _add_own_key(pert, q, k_own, v_own, qk_scale, own_bias)
        else:
            full, pert, visits = _attend_keys(
                q, k_base, v_base, stride_kn, stride_vn, N, qk_scale, full, pert, visits,
                HEAD_DIM, BLOCK_D, BLOCK_N, STRIDE_MULTIPLE, INPUT_PRECISION,
                bias_base=bias_base, offs_m=offs_m, stride_bias_m=stride_bias_m, stride_bias_n=stride_bias_n,
                BIAS_KIND=BIAS_KIND, lo=text_start, hi=text_end, text_lo=text_lo, text_hi=text_hi, FULL=True, PERTURBED=False)
        if need_full:
            full, pert, visits = _attend_keys(
                q, k_base, v_base, stride_kn, stride_vn, N, qk_scale, full, pert, visits,
                HEAD_DIM, BLOCK_D, BLOCK_N, STRIDE_MULTIPLE, INPUT_PRECISION,
                bias_base=bias_base, offs_m=offs_m, stride_bias_m=stride_bias_m, stride_bias_n=stride_bias_n,
                BIAS_KIND=BIAS_KIND, lo=0, hi=text_start, text_lo=text_lo, text_hi=text_hi, FULL=True, PERTURBED=False)
            full, pert, visits = _attend_keys(
                q, k_base, v_base, stride_kn, stride_vn, N, qk_scale, full, pert, visits,
                HEAD_DIM, BLOCK_D, BLOCK_N, STRIDE_MULTIPLE, INPUT_PRECISION,
                bias_base=bias_base, offs_m=offs_m, stride_bias_m=stride_bias_m, stride_bias_n=stride_bias_n,
                BIAS_KIND=BIAS_KIND, lo=text_end, hi=N, text_lo=text_lo, text_hi=text_hi, FULL=True, PERTURBED=False)
        attention = _normalized(full)
        perturbed = tl.where(query_is_text[:, None], attention, _normalized(pert))
        out = (1.0 - u) * attention + u * perturbed
    else:
        hi = N
        if u == 1.0:
            hi = 0
        full, pert, visits = _attend_keys(
            q, k_base, v_base, stride_kn, stride_vn, N, qk_scale, full, pert, visits,
            HEAD_DIM, BLOCK_D, BLOCK_N, STRIDE_MULTIPLE, INPUT_PRECISION,
            bias_base=bias_base, offs_m=offs_m, stride_bias_m=stride_bias_m, stride_bias_n=stride_bias_n,
            BIAS_KIND=BIAS_KIND, lo=0, hi=hi, text_lo=0, text_hi=0, FULL=True, PERTURBED=False)
        attention = _normalized(full)
        # The identity term v at the query rows; not even loaded when u == 0.
        identity_dims = tl.where(u > 0.0, HEAD_DIM, 0)
        v_own = tl.load(_row_tile(v_base, offs_m, stride_vn, offs_d, STRIDE_MULTIPLE),
                        mask=(offs_m < N)[:, None] & (offs_d[None, :] < identity_dims), other=0.0)
        out = (1.0 - u) * attention + u * v_own.to(tl.float32)

    o_base = _pair_base(O, b, h, stride_ob, stride_oh, STRIDE_MULTIPLE)
    tl.store(_row_tile(o_base, offs_m, stride_on, offs_d, STRIDE_MULTIPLE), out.to(O.dtype.element_ty), mask=row_tile_ok)
    if COUNT_VISITS:
        tl.store(VISITS + pid_bh * tl.num_programs(0) + pid_m, visits)


#: CUDA's grid limits: axis 0 up to 2**31 - 1 programs, axes 1 and 2 up to 65535.
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535


class Chunk(NamedTuple):
    """The (batch row, head) pairs ``[b0, b1) x [h0, h1)`` of one launch and its grid ``(query blocks, pairs)``."""

    b0: int
    b1: int
    h0: int
    h1: int
    grid: tuple[int, int]


def launch_plan(B: int, H: int, N: int, block_m: int, max_pairs: int | None = None) -> list[Chunk]:
    """The launches of one call: the kernel's grid is (query blocks, pairs), and grid axis 1 holds at most
    ``max_pairs`` (CUDA: 65535) pairs, so a call with more (batch row, head) pairs runs in chunks, each of whole
    batch rows (of head ranges when one row has more heads than that). One chunk, the whole call, when it fits.
    Raises ``ValueError`` when the query blocks exceed grid axis 0 (2**31 - 1)."""
    max_pairs = MAX_GRID_YZ if max_pairs is None else max_pairs
    n_blocks = triton.cdiv(N, block_m)
    if n_blocks > MAX_GRID_X:
        raise ValueError(f"sequence too long for one launch: cdiv(N, BLOCK_M) = {n_blocks} query blocks > 2**31 - 1")
    if B * H <= max_pairs:
        return [Chunk(0, B, 0, H, (n_blocks, B * H))]
    if H > max_pairs:  # more heads than one launch takes: head ranges of one row at a time
        return [Chunk(b, b + 1, h0, min(H, h0 + max_pairs), (n_blocks, min(H, h0 + max_pairs) - h0))
                for b in range(B) for h0 in range(0, H, max_pairs)]
    rows = max_pairs // H
    return [Chunk(b0, min(B, b0 + rows), 0, H, (n_blocks, (min(B, b0 + rows) - b0) * H)) for b0 in range(0, B, rows)]


def _pairs(t: torch.Tensor, layout: str, chunk: Chunk) -> torch.Tensor:
    """The view of a q/k/v/out tensor holding the pairs of ``chunk`` (the same strides, an offset pointer)."""
    t = t[chunk.b0:chunk.b1]
    return t[:, chunk.h0:chunk.h1] if layout == "bhnd" else t[:, :, chunk.h0:chunk.h1]


def _bias_pairs(bias: torch.Tensor | None, chunk: Chunk) -> torch.Tensor | None:
    """The bias of ``chunk``'s pairs; a broadcast (size-1) batch or head dim is kept as is."""
    if bias is None:
        return None
    rows = slice(chunk.b0, chunk.b1) if bias.shape[0] > 1 else slice(None)
    heads = slice(chunk.h0, chunk.h1) if bias.shape[1] > 1 else slice(None)
    return bias[rows, heads]


def check_interpreter_dtype(dtype: torch.dtype) -> None:
    """Refuses bfloat16 under ``TRITON_INTERPRET=1``: the interpreter's bf16 ``tl.dot`` returns wrong values (around
    1e8 for unit inputs) without an error. bf16 kernel numerics are tested on GPUs only."""
    if dtype == torch.bfloat16 and interpreting():
        raise TypeError(
            "backend='triton' under TRITON_INTERPRET=1 (Triton's CPU interpreter) does not support bfloat16: the "
            "interpreter's bf16 tl.dot returns wrong values; use backend='torch' (or 'auto') for bfloat16 on CPU, "
            "float16 / float32 under the interpreter, or a GPU"
        )


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_autotuned: dict[tuple[int, int, str, int], object] = {}


def _autotuned_kernel(arch: int, block_d: int, mode: str, bias_kind: int):
    """The kernel wrapped in ``triton.autotune`` with this arch's configs, built once per key.

    Tuning is keyed on the sequence length, head dim and dtypes (the autotuner adds the latter), so a
    sampling loop with a fixed resolution tunes once.
    """
    key = (arch, block_d, mode, bias_kind)
    if key not in _autotuned:
        configs = [
            triton.Config({"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in configs_for(arch, block_d, mode, bias_kind)
        ]
        _autotuned[key] = triton.autotune(configs=configs, key=["N", "HEAD_DIM", "IMAGE_MODE", "BIAS_KIND"])(_perturbed_attention_fwd)
    return _autotuned[key]


def _strides_bhn(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """Strides of the batch, head and token dims; the head dim (last in both layouts) has stride 1."""
    s = t.stride()
    return (s[0], s[1], s[2]) if layout == "bhnd" else (s[0], s[2], s[1])


def unit_stride_head_dim(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last (head) dim has stride 1, else a contiguous copy. The kernel indexes the head
    dim without a stride: a stride Triton cannot see is 1 would hide the contiguity its vectorised, pipelined
    loads (cp.async) need."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def stride_multiple(strides) -> int:
    """``STRIDE_MULTIPLE``: the largest of 16, 8 and 1 that divides every batch, head and token stride.

    The kernel marks its row offsets as multiples of it (``tl.multiple_of``), so rows are known to start 16-byte
    aligned (with 16-byte aligned pointers, which the JIT checks) also at head dims such as 40 or 72 that the JIT's
    own divisible-by-16 specialisation of the strides misses: the vectorised, software-pipelined (cp.async) loads
    need that. 16 keeps what that specialisation would have said; 1 is returned only where it says nothing."""
    strides = list(strides)
    return next(m for m in (16, 8, 1) if all(s % m == 0 for s in strides))


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use tf32 dots exactly when ``torch.backends.cuda.matmul.allow_tf32`` is set (torch's own
    rule for matmuls); otherwise full-precision ``ieee`` dots."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def bias_kind(bias: torch.Tensor | None) -> int:
    """``BIAS_KIND`` of a validated 4-D score bias: 0 none, 1 one bias per key (every query row shares it), 2 one
    per (query, key) pair."""
    if bias is None:
        return 0
    return 1 if bias.shape[2] == 1 else 2


def _bias_strides(bias: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Batch, head, query and key strides of the bias; 0 along its broadcast (size-1) dims."""
    if bias is None:
        return (0, 0, 0, 0)
    return tuple(0 if size == 1 else stride for size, stride in zip(bias.shape, bias.stride()))


def text_span(N: int, n_text: int, text_first: bool) -> tuple[int, int]:
    """Token index range ``[lo, hi)`` of the text tokens."""
    return (0, n_text) if text_first else (N - n_text, N)


def triton_perturbed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    *,
    layout: str,
    mode: str,
    n_text: int,
    text_first: bool,
    scale: float,
    bias: torch.Tensor | None = None,
    count_visits: bool = False,
):
    """Launches the fused kernel on validated inputs; ``u`` is a float32 ``(B, H)`` tensor on q's device, ``bias``
    the float32 additive score bias ``(B or 1, H or 1, N or 1, N)`` of the attention mask, or None.

    Returns the output in q's layout (contiguous) and, with ``count_visits``, an int32 ``(B, H, M_blocks)``
    tensor of key blocks visited per query block.
    """
    if q.dtype == torch.float64:
        raise TypeError("the Triton kernel supports q.dtype float16, bfloat16 or float32, got float64; use backend='torch'")
    check_interpreter_dtype(q.dtype)
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before importing "
            f"triton), got device {q.device}; use backend='torch' or 'auto'"
        )
    B, H, N, D = logical_shape(q, layout)
    block_d = padded_head_dim(D)
    q, k, v = (unit_stride_head_dim(t) for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    text_lo, text_hi = text_span(N, n_text, text_first)
    image_mode = mode == "image"

    strides = (*_strides_bhn(q, layout), *_strides_bhn(k, layout), *_strides_bhn(v, layout), *_strides_bhn(out, layout))
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, IMAGE_MODE=image_mode, INPUT_PRECISION=input_precision(q.dtype),
                  STRIDE_MULTIPLE=stride_multiple(strides), BIAS_KIND=bias_kind(bias))
    bias_strides = _bias_strides(bias)

    def launch(kernel, chunk: Chunk, visits, **config):
        """One launch over ``chunk``'s pairs: views of the same tensors (same strides, offset pointers)."""
        c_bias = _bias_pairs(bias, chunk)
        c_u = u[chunk.b0:chunk.b1, chunk.h0:chunk.h1]
        kernel(
            *(_pairs(t, layout, chunk) for t in (q, k, v)), c_u, _pairs(out, layout, chunk), visits,
            c_u if c_bias is None else c_bias,  # any float32 pointer when there is no bias: never read
            *strides, u.stride(0), u.stride(1), *bias_strides,
            chunk.h1 - chunk.h0, N, text_lo, text_hi, scale * LOG2E, **config, **common,
        )

    if interpreting():
        cfg = INTERPRETER_CONFIG
        n_blocks = triton.cdiv(N, cfg.BLOCK_M)
        visits = torch.zeros((B, H, n_blocks), dtype=torch.int32, device=q.device) if count_visits else out
        for chunk in launch_plan(B, H, N, cfg.BLOCK_M):
            # the kernel writes visit counts of its pairs contiguously: (pairs, query blocks)
            c_visits = (torch.zeros((chunk.b1 - chunk.b0, chunk.h1 - chunk.h0, n_blocks), dtype=torch.int32,
                                    device=q.device) if count_visits else out)
            launch(_perturbed_attention_fwd[chunk.grid], chunk, c_visits, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                   COUNT_VISITS=count_visits, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if count_visits:
                visits[chunk.b0:chunk.b1, chunk.h0:chunk.h1] = c_visits
        return (out, visits) if count_visits else out
    if count_visits:
        raise ValueError("count_visits is a debug mode of the interpreter (TRITON_INTERPRET=1) only")
    major, minor = torch.cuda.get_device_capability(q.device)
    arch = major * 10 + minor
    kernel = _autotuned_kernel(arch, block_d, mode, common["BIAS_KIND"])
    for chunk in launch_plan(B, H, N, 1):  # the chunks do not depend on BLOCK_M (the grid's axis 0 does)
        grid = lambda meta, pairs=chunk.grid[1]: (triton.cdiv(N, meta["BLOCK_M"]), pairs)  # noqa: E731
        launch(kernel[grid], chunk, out, COUNT_VISITS=False)
    return out
