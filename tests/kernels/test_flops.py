"""FLOP accounting on the meta device (``FlopCounterMode`` counts SDPA as 0 FLOPs on CPU tensors, so every
count here is taken on meta tensors, where no data exists and the host-side plan decides the work).

The oracle for the op's registered formula is ``FlopCounterMode`` itself, counting the matrix products that
``torch_perturbed_attention`` really issues (SDPA and bmm) on the same meta inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from headpag.kernels import perturbed_attention
from headpag.kernels.torch_path import torch_perturbed_attention
from headpag.kernels.validation import IDENTITY, PLAIN, SOFT


def meta_qkv(B, H, N, D, layout="bhnd", dtype=torch.float16):
    shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
    return tuple(torch.empty(shape, device="meta", dtype=dtype) for _ in range(3))


def count(fn, *args, **kwargs) -> tuple[int, object]:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return counter.get_total_flops(), out


def op_flops(q, k, v, plan, **kwargs) -> int:
    B, H = q.shape[0], (q.shape[1] if kwargs.get("layout", "bhnd") == "bhnd" else q.shape[2])
    u = torch.empty(B, H, device="meta")
    flops, out = count(perturbed_attention, q, k, v, u, plan=plan, **kwargs)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == q.dtype
    return flops


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("B, H, N, D", [(2, 3, 37, 64), (1, 24, 4096 + 333, 64), (2, 8, 77, 160)])
def test_plain_attention_costs_4BHN2D(B, H, N, D, layout, backend):
    q, k, v = meta_qkv(B, H, N, D, layout)
    flops = op_flops(q, k, v, PLAIN, layout=layout, backend=backend)
    assert flops == 4 * B * H * N * N * D > 0
    # u == 0 is plain attention in image mode too: the perturbed map is never formed.
    assert op_flops(q, k, v, [[PLAIN] * H] * B, layout=layout, backend=backend, mode="image", n_text=N // 3) == flops


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n_identity", [0, 1, 2, 5, 6])
def test_each_identity_pair_saves_4N2D_in_joint_mode(n_identity, backend):
    B, H, N, D = 2, 3, 50, 128
    q, k, v = meta_qkv(B, H, N, D, "bnhd")
    codes = [IDENTITY] * n_identity + [PLAIN, SOFT] * 3
    plan = torch.tensor(codes[: B * H], dtype=torch.int8).view(B, H)
    baseline = op_flops(q, k, v, PLAIN, layout="bnhd", backend=backend)
    flops = op_flops(q, k, v, plan, layout="bnhd", backend=backend)
    assert baseline - flops == n_identity * 4 * N * N * D
    # SOFT pairs cost what plain ones do in joint mode (the identity term is element-wise).
    assert flops == (B * H - n_identity) * 4 * N * N * D


# Mixed plans; every case holds a PLAIN, a SOFT and an IDENTITY pair where B * H allows.
PLANS = [
    [[0, 1, 2], [2, 2, 1]],
    [[2, 2, 2], [2, 2, 2]],
    [[1, 1, 1], [0, 0, 0]],
    [[0, 2, 0], [1, 0, 2]],
]


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize(
    "mode, n_text, text_first",
    [("joint", 0, False), ("image", 9, True), ("image", 9, False), ("image", 0, False), ("image", 41, True), ("image", 1, False)],
)
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "".join(str(c) for row in p for c in row))
def test_torch_path_issues_exactly_the_formula(plan, mode, n_text, text_first, layout):
    B, H, N, D = 2, 3, 41, 72
    q, k, v = meta_qkv(B, H, N, D, layout)
    flat = [c for row in plan for c in row]
    u = torch.empty(B, H, device="meta")
    kwargs = dict(layout=layout, mode=mode, n_text=n_text, text_first=text_first)
    counted, out = count(torch_perturbed_attention, q, k, v, u, flat, scale=0.125, **kwargs)
    assert out.shape == q.shape
    formula = op_flops(q, k, v, plan, backend="torch", **kwargs)
    assert counted == formula
    # And the closed form per pair (image mode: text rows keep A, image rows of P see the text keys).
    n_img = N - n_text
    per_pair = {
        "joint": {PLAIN: 4 * N * N * D, SOFT: 4 * N * N * D, IDENTITY: 0},
        "image": {
            PLAIN: 4 * N * N * D,
            SOFT: 4 * N * N * D + 4 * n_img * n_text * D,
            IDENTITY: 4 * n_text * N * D + 4 * n_img * n_text * D,
        },
    }[mode]
    assert counted == sum(per_pair[c] for row in plan for c in row)


def test_triton_formula_reuses_scores_for_soft_image_pairs():
    # The fused kernel forms q k^T once for both softmaxes of a SOFT pair: only P v is extra.
    B, H, N, D, n_text = 1, 2, 64, 64, 16
    q, k, v = meta_qkv(B, H, N, D)
    plain = op_flops(q, k, v, PLAIN, backend="triton", mode="image", n_text=n_text)
    soft = op_flops(q, k, v, SOFT, backend="triton", mode="image", n_text=n_text)
    soft_torch = op_flops(q, k, v, SOFT, backend="torch", mode="image", n_text=n_text)
    extra = 2 * (N - n_text) * n_text * D
    assert soft - plain == H * extra
    assert soft_torch - plain == H * 2 * extra


def test_formula_counts_the_custom_op_only_once():
    q, k, v = meta_qkv(1, 2, 33, 64)
    with FlopCounterMode(display=False) as counter:
        perturbed_attention(q, k, v, torch.empty(1, 2, device="meta"), plan=[0, 2], backend="torch")
    counts = counter.get_flop_counts()["Global"]
    assert {str(op) for op in counts} == {"headpag.perturbed_attention"}
    assert sum(counts.values()) == 4 * 33 * 33 * 64


@pytest.mark.parametrize("u", [torch.empty(2, 3, device="meta"), 0.5, [0.0, 1.0, 0.5]])
def test_meta_without_plan_raises(u):
    q, k, v = meta_qkv(2, 3, 17, 64)
    with pytest.raises(ValueError, match="plan is required"):
        perturbed_attention(q, k, v, u, backend="torch")
