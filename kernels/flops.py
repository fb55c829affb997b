"""Algorithmic FLOPs of ``perturbed_attention``: the matrix products each backend actually performs.

Counted like torch's own SDPA formula: ``2 * m * n * k`` per matrix product, softmax and element-wise
blending not counted, tile padding not counted. Pure arithmetic on the host-side codes (PLAIN / SOFT / IDENTITY
per (row, head)), so it serves the custom op's FLOP formula on the meta device and the benchmarks' theoretical
minimum alike.
"""

from __future__ import annotations

from typing import Iterable

from .constants import IDENTITY, PLAIN, SOFT


def pair_flops(code: int, N: int, D: int, mode: str, n_text: int, backend: str) -> int:
    """FLOPs for one (batch row, head) pair of class ``code`` (PLAIN / SOFT / IDENTITY)."""
    full = 4 * N * N * D  # q k^T and A v
    if mode == "joint":
        return 0 if code == IDENTITY else full
    n_img = N - n_text
    perturbed_rows = 4 * n_img * n_text * D  # image queries x text keys: scores and P v
    if code == PLAIN:
        return full
    if code == IDENTITY:
        return 4 * n_text * N * D + perturbed_rows  # text rows keep A
    # SOFT: the kernel reuses the scores of the full pass and adds only P v; the torch path recomputes them.
    return full + (perturbed_rows // 2 if backend == "triton" else perturbed_rows)


def attention_flops(codes: Iterable[int], N: int, D: int, mode: str, n_text: int, backend: str) -> int:
    """Total FLOPs of one call whose flattened codes (one per (row, head)) are ``codes``."""
    counts = {PLAIN: 0, SOFT: 0, IDENTITY: 0}
    for code in codes:
        counts[int(code)] += 1
    return sum(n * pair_flops(code, N, D, mode, n_text, backend) for code, n in counts.items())
