"""Inputs that used to give a wrong result or an unclear error: bf16 under the Triton interpreter, a meta ``u``
with CPU q/k/v, numpy integers for ``n_text``; and the launch grid within CUDA's limits for any ``B * H``."""

from __future__ import annotations

import pytest
import torch

from headpag.kernels import perturbed_attention, reference_attention
from headpag.kernels import triton_kernel
from headpag.kernels.validation import prepare_mask
from support.qkv import make_qkv

# CUDA's grid limits: x up to 2**31 - 1 blocks, y and z up to 65535.
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def within_cuda_limits(grid) -> bool:
    return 1 <= len(grid) <= 3 and all(1 <= n <= limit for n, limit in zip(grid, CUDA_GRID_LIMITS))


# --- item 6: bf16 under the interpreter ------------------------------------------------------------------------


def test_triton_interpreter_refuses_bfloat16():
    """The interpreter's bf16 ``tl.dot`` returns values around 1e8 (issue 13): refused, not returned."""
    q, k, v = make_qkv(1, 2, 16, 16, dtype=torch.bfloat16)
    assert triton_kernel.interpreting()
    with pytest.raises(TypeError, match=r"TRITON_INTERPRET=1.*bfloat16.*use backend='torch'"):
        perturbed_attention(q, k, v, 0.5, backend="triton")
    with pytest.raises(TypeError, match="bfloat16"):  # the launcher itself refuses it too (custom op called directly)
        triton_kernel.triton_perturbed_attention(q, k, v, torch.full((1, 2), 0.5), layout="bhnd", mode="joint",
                                                 n_text=0, text_first=False, scale=0.25)
    out = perturbed_attention(q, k, v, 0.5, backend="auto")  # CPU tensors: the torch path serves bf16
    ref = reference_attention(q.float(), k.float(), v.float(), 0.5)
    assert (out.float() - ref).abs().max() < 3e-2


# --- item 13: a meta u with CPU q, k, v; numpy n_text -----------------------------------------------------------


def test_a_meta_u_with_cpu_qkv_is_a_clear_error():
    q, k, v = make_qkv(1, 2, 16, 16)
    u = torch.full((1, 2), 0.5, device="meta")
    for plan in (None, 1):
        with pytest.raises(ValueError, match=r"^u is on the meta device but q, k, v are on cpu"):
            perturbed_attention(q, k, v, u, plan=plan, backend="torch")


def test_numpy_integer_n_text():
    np = pytest.importorskip("numpy")
    q, k, v = make_qkv(1, 2, 20, 16)
    want = perturbed_attention(q, k, v, 0.5, mode="image", n_text=5, backend="torch")
    got = perturbed_attention(q, k, v, 0.5, mode="image", n_text=np.int64(5), backend="torch")
    assert torch.equal(got, want)


# --- item 14: the launch grid -----------------------------------------------------------------------------------


def covered_pairs(plan, B, H) -> torch.Tensor:
    """How often each (batch row, head) pair is launched by ``plan``."""
    count = torch.zeros(B, H, dtype=torch.int64)
    for chunk in plan:
        count[chunk.b0:chunk.b1, chunk.h0:chunk.h1] += 1
        assert chunk.grid[1] == (chunk.b1 - chunk.b0) * (chunk.h1 - chunk.h0)
    return count


@pytest.mark.parametrize("B, H, N, block_m", [(70000, 1, 16, 16), (2, 35000, 4096, 128), (4375, 16, 1024, 64),
                                              (1, 70000, 77, 16), (3, 200000, 64, 32), (65535, 1, 10**6, 128),
                                              (1, 1, 1, 16), (16, 24, 4096, 128)])
def test_the_launch_plan_stays_within_cuda_limits(B, H, N, block_m):
    """B * H above 65535 (CUDA's limit on grid axes 1 and 2) is launched in chunks, each within the limits; together
    they launch every (batch row, head) pair once; a call that fits is one launch of the whole call."""
    plan = triton_kernel.launch_plan(B, H, N, block_m)
    assert all(within_cuda_limits(chunk.grid) for chunk in plan), plan[:3]
    assert all(chunk.grid[0] == triton_kernel.triton.cdiv(N, block_m) for chunk in plan)
    assert bool((covered_pairs(plan, B, H) == 1).all())
    if B * H <= 65535:
        assert plan == [triton_kernel.Chunk(0, B, 0, H, (triton_kernel.triton.cdiv(N, block_m), B * H))]
    elif H <= 65535:  # whole rows per launch, as many as fit
        assert all(chunk.h0 == 0 and chunk.h1 == H for chunk in plan) and len(plan) == -(-B // (65535 // H))


class _RecordingKernel:
    """Stands in for the jitted kernel: records the grid and q's view of each launch instead of launching."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda q, *args, **kwargs: self.launches.append((grid, q))


@pytest.mark.parametrize("B, H", [(70000, 1), (1, 70000), (350, 200), (3, 5)])
def test_the_launcher_keeps_every_grid_within_cuda_limits(B, H, monkeypatch):
    """The launches for B * H = 70000 (before: one grid (query blocks, B * H), axis 1 over 65535)."""
    fake = _RecordingKernel()
    monkeypatch.setattr(triton_kernel, "_perturbed_attention_fwd", fake)
    N, D = 20, 16
    q = torch.zeros(B, H, N, D, dtype=torch.float16)
    triton_kernel.triton_perturbed_attention(q, q, q, torch.full((B, H), 0.5), layout="bhnd", mode="joint", n_text=0,
                                             text_first=False, scale=0.25)
    assert all(within_cuda_limits(grid) for grid, _ in fake.launches)
    assert sum(grid[1] for grid, _ in fake.launches) == B * H
    assert all(view.shape[0] * view.shape[1] == grid[1] for grid, view in fake.launches)
    assert len(fake.launches) == (1 if B * H <= 65535 else 2)


@pytest.mark.parametrize("max_pairs", [4, 7, 65535], ids=["head-ranges", "rows", "one-launch"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("mode, mask", [("joint", None), ("image", "key"), ("image", "pair")])
def test_chunked_launches_compute_the_same(max_pairs, layout, mode, mask, monkeypatch):
    """Under the interpreter, with grid axis 1 pretended to hold only ``max_pairs`` pairs (B * H = 15): the chunks
    together give the oracle's output and the visit counts of one launch, with u, masks and layouts per pair."""
    B, H, N, D = 3, 5, 40, 16
    q, k, v = make_qkv(B, H, N, D, layout=layout, seed=3)
    u = torch.rand(B, H, generator=torch.Generator().manual_seed(4))
    u[0, 1], u[2, 4], u[1, 0] = 0.0, 1.0, 1.0
    g = torch.Generator().manual_seed(5)
    attn_mask = {None: None, "key": torch.rand(B, N, generator=g) > 0.2,
                 "pair": torch.randn(1, H, N, N, generator=g)}[mask]
    shape = triton_kernel.logical_shape(q, layout)
    bias = prepare_mask(attn_mask, shape, q)
    kwargs = dict(layout=layout, mode=mode, n_text=7, text_first=True, scale=D ** -0.5, bias=bias, count_visits=True)
    want_out, want_visits = triton_kernel.triton_perturbed_attention(q, k, v, u, **kwargs)
    monkeypatch.setattr(triton_kernel, "MAX_GRID_YZ", max_pairs)
    out, visits = triton_kernel.triton_perturbed_attention(q, k, v, u, **kwargs)
    ref = reference_attention(q, k, v, u, layout=layout, mode=mode, n_text=7, text_first=True, attn_mask=attn_mask)
    assert (out - ref).abs().max() < 1e-4
    assert torch.equal(out, want_out) and torch.equal(visits, want_visits)
