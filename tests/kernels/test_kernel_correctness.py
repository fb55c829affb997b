"""The Triton kernel (under TRITON_INTERPRET=1, on CPU tensors) and the torch path against the float64
materialised-map oracle ``reference_attention``, plus closed forms that need no oracle at all.

The interpreter costs ~10 ms per (query block, key block) step, so shapes stay small (B <= 2, H <= 3,
N <= 50) and the axes are not crossed exhaustively: ``test_mode_u_grid`` crosses every mode case with every
u case; the other tests sweep one axis each (head dim, sequence length, layout/memory variant, dtype, scale,
u's form) over mixed u and both modes.
"""

from __future__ import annotations

import math

import pytest
import torch

from headpag.kernels import perturbed_attention, reference_attention
from support.qkv import QKV_VARIANTS, make_qkv, to_bhnd
from support.tolerances import TOLERANCES, assert_matches

BACKEND_DTYPES = {
    # The interpreter's bf16 tl.dot is broken, so bf16 runs on the torch path only; the kernel rejects fp64.
    "triton": (torch.float32, torch.float16),
    "torch": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}
HEAD_DIMS = (40, 64, 72, 80, 96, 128, 160, 256)

# (mode, n_text, text_first); n_text "small" and "all" are resolved against N by n_text_for.
MODE_CASES = (
    ("joint", 0, False),
    ("image", 0, True),
    ("image", "small", True),
    ("image", "all", True),
    ("image", 0, False),
    ("image", "small", False),
    ("image", "all", False),
)
MODE_IDS = ["joint"] + [f"image-n{n}-{'textfirst' if tf else 'textlast'}" for _, n, tf in MODE_CASES[1:]]

MIXED = (0.0, 1.0, 0.5, 1.0, 0.0, 0.25, 0.75)  # cycled over (row, head): plain, identity and soft pairs


def mixed_u(B: int, H: int) -> torch.Tensor:
    """A (B, H) float32 tensor whose rows and heads differ and mix u == 0, u == 1 and soft values."""
    return torch.tensor([[MIXED[(b * H + h + b) % len(MIXED)] for h in range(H)] for b in range(B)])


# name -> u argument for (B, H): every form perturbed_attention accepts, and the values that matter.
U_CASES = {
    "zeros": lambda B, H: torch.zeros(B, H),
    "ones": lambda B, H: torch.ones(B, H),
    "mixed-BH-tensor": mixed_u,
    "per-head-list": lambda B, H: [(0.0, 1.0, 0.5)[h % 3] for h in range(H)],
    "python-float": lambda B, H: 0.75,
    "softpag-0.25": lambda B, H: 0.25,
    "softpag-0.5": lambda B, H: torch.tensor(0.5),
}


def n_text_for(spec, N: int) -> int:
    if spec == "all":
        return N
    if spec == "small":
        return min(5, N)
    return spec


def reference_in_float64(q, k, v, u, *, layout, mode, n_text, text_first, scale=None):
    """The oracle from the same inputs, in float64, computed in (B, H, N, D) order and put back into the
    layout here, so the backends' layout handling is checked independently of the reference's."""
    q64, k64, v64 = (to_bhnd(t, layout).to(torch.float64) for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, u, layout="bhnd", mode=mode, n_text=n_text, text_first=text_first, scale=scale)
    return ref if layout == "bhnd" else ref.transpose(1, 2)


def run_and_check(backend, q, k, v, u, *, layout="bhnd", mode="joint", n_text=0, text_first=False, scale=None):
    """Runs the op, checks the output's form and that the inputs are untouched, compares with the oracle."""
    before = [t.clone() for t in (q, k, v)]
    out = perturbed_attention(
        q, k, v, u, layout=layout, mode=mode, n_text=n_text, text_first=text_first, scale=scale, backend=backend
    )
    assert out.shape == q.shape, "the output has q's logical shape in q's layout"
    assert out.dtype == q.dtype
    assert out.device == q.device
    assert out.is_contiguous()
    for name, t, t0 in zip("qkv", (q, k, v), before):
        assert torch.equal(t, t0), f"{name} was modified"
    ref = reference_in_float64(q, k, v, u, layout=layout, mode=mode, n_text=n_text, text_first=text_first, scale=scale)
    assert_matches(out, ref, q.dtype, msg=f"{backend} {q.dtype} {layout} {mode} n_text={n_text} text_first={text_first}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Every mode case x every u case (both backends).


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("u_case", list(U_CASES))
@pytest.mark.parametrize("mode, n_text_spec, text_first", MODE_CASES, ids=MODE_IDS)
def test_mode_u_grid(backend, u_case, mode, n_text_spec, text_first):
    # N = 23: two 16-row blocks, so with a few text tokens one block is pure image rows and the u == 1 skip
    # of image-image key blocks is exercised, with text first and last.
    B, H, N, D = 2, 2, 23, 40
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = make_qkv(B, H, N, D, dtype=dtype, seed=11)
    run_and_check(backend, q, k, v, U_CASES[u_case](B, H), mode=mode, n_text=n_text_for(n_text_spec, N), text_first=text_first)


# ---------------------------------------------------------------------------------------------------------------
# One axis at a time, over mixed u and both modes.


@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize(
    "backend, dtype",
    [(b, d) for b, ds in BACKEND_DTYPES.items() for d in ds],
    ids=lambda x: str(x).replace("torch.", ""),
)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(D, backend, dtype, mode):
    B, H, N = 1, 3, 21
    q, k, v = make_qkv(B, H, N, D, layout="bnhd", variant="permuted", dtype=dtype, seed=D)
    run_and_check(backend, q, k, v, mixed_u(B, H), layout="bnhd", mode=mode, n_text=6, text_first=D % 16 == 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("N", [1, 2, 15, 16, 17, 37, 50])
def test_seq_lens(N, mode, backend):
    B, H, D = (1, 3, 64) if N == 50 else (2, 2, 64)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = make_qkv(B, H, N, D, dtype=dtype, seed=N)
    # Text tokens straddle a block edge where N allows it.
    n_text = min(N, 3 if N < 37 else 19)
    run_and_check(backend, q, k, v, mixed_u(B, H), mode=mode, n_text=n_text, text_first=N % 2 == 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("variant", QKV_VARIANTS)
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_layouts_and_strides(layout, variant, mode, backend):
    B, H, N, D = 2, 3, 19, 72
    q, k, v = make_qkv(B, H, N, D, layout=layout, variant=variant, dtype=torch.float32, seed=3)
    out = run_and_check(backend, q, k, v, mixed_u(B, H), layout=layout, mode=mode, n_text=4, text_first=False)
    expected_shape = (B, H, N, D) if layout == "bhnd" else (B, N, H, D)
    assert tuple(out.shape) == expected_shape


@pytest.mark.parametrize(
    "backend, dtype",
    [(b, d) for b, ds in BACKEND_DTYPES.items() for d in ds],
    ids=lambda x: str(x).replace("torch.", ""),
)
@pytest.mark.parametrize("mode, n_text, text_first", [("joint", 0, False), ("image", 7, True), ("image", 7, False)], ids=["joint", "image-textfirst", "image-textlast"])
def test_dtypes(mode, n_text, text_first, backend, dtype):
    B, H, N, D = 2, 3, 29, 64
    q, k, v = make_qkv(B, H, N, D, layout="bnhd", variant="packed", dtype=dtype, seed=5)
    run_and_check(backend, q, k, v, mixed_u(B, H), layout="bnhd", mode=mode, n_text=n_text, text_first=text_first)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["joint", "image"])
@pytest.mark.parametrize("scale", [0.05, 0.3, 2.0])
def test_custom_scale(scale, mode, backend):
    B, H, N, D = 1, 3, 19, 40
    q, k, v = make_qkv(B, H, N, D, seed=9)
    u = [0.0, 0.5, 1.0]
    out = run_and_check(backend, q, k, v, u, mode=mode, n_text=5, text_first=True, scale=scale)
    # The scale is really used: the default one (D ** -0.5 ~ 0.158) gives a clearly different result.
    default = perturbed_attention(q, k, v, u, mode=mode, n_text=5, text_first=True, backend=backend)
    assert (out - default).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_default_scale_is_inverse_sqrt_head_dim(backend):
    q, k, v = make_qkv(1, 2, 17, 80, seed=4)
    u = [0.25, 0.0]
    implicit = perturbed_attention(q, k, v, u, backend=backend)
    explicit = perturbed_attention(q, k, v, u, backend=backend, scale=80 ** -0.5)
    assert torch.equal(implicit, explicit)
    doubled = perturbed_attention(q, k, v, u, backend=backend, scale=2 * 80 ** -0.5)
    assert not torch.allclose(implicit, doubled, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# u's forms: host numbers and CPU tensors of any broadcastable shape give the same coefficients.


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["joint", "image"])
def test_u_forms_are_equivalent(backend, mode):
    B, H, N, D = 2, 3, 9, 16
    q, k, v = make_qkv(B, H, N, D, seed=8)
    kw = dict(mode=mode, n_text=4, text_first=True, backend=backend)
    per_head = [0.0, 1.0, 0.5]

    full = perturbed_attention(q, k, v, torch.tensor([per_head, per_head]), **kw)
    assert_matches(full, reference_in_float64(q, k, v, [per_head] * B, layout="bhnd", mode=mode, n_text=4, text_first=True), q.dtype)
    for u in (
        per_head,  # host list (H,)
        tuple(per_head),
        [per_head, per_head],  # host nested list (B, H)
        torch.tensor(per_head),  # CPU tensor (H,)
        torch.tensor([per_head], dtype=torch.float64),  # (1, H), float64
        torch.tensor([per_head, per_head]).t().contiguous().t(),  # non-contiguous (B, H) view
    ):
        assert torch.equal(perturbed_attention(q, k, v, u, **kw), full), repr(u)

    per_row = torch.tensor([[0.25], [1.0]])  # (B, 1): one value per batch row
    rows = perturbed_attention(q, k, v, per_row, **kw)
    assert torch.equal(perturbed_attention(q, k, v, [[0.25] * H, [1.0] * H], **kw), rows)
    assert_matches(rows, reference_in_float64(q, k, v, per_row.expand(B, H), layout="bhnd", mode=mode, n_text=4, text_first=True), q.dtype)

    for scalar, same in ((0.5, torch.full((B, H), 0.5)), (1, torch.ones(B, H)), (0, torch.zeros(B, H, dtype=torch.float64))):
        assert torch.equal(perturbed_attention(q, k, v, scalar, **kw), perturbed_attention(q, k, v, same, **kw)), scalar


def test_auto_backend_on_cpu_is_the_torch_path():
    q, k, v = make_qkv(2, 3, 17, 40, seed=2)
    u = mixed_u(2, 3)
    for mode in ("joint", "image"):
        auto = perturbed_attention(q, k, v, u, mode=mode, n_text=3)
        assert torch.equal(auto, perturbed_attention(q, k, v, u, mode=mode, n_text=3, backend="torch"))


# ---------------------------------------------------------------------------------------------------------------
# Closed forms: no oracle needed.


@pytest.mark.parametrize(
    "backend, dtype",
    [(b, d) for b, ds in BACKEND_DTYPES.items() for d in ds],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_joint_identity_returns_v_exactly(backend, dtype):
    q, k, v = make_qkv(2, 2, 37, 64, layout="bnhd", variant="permuted", dtype=dtype, seed=6)
    out = perturbed_attention(q, k, v, 1.0, layout="bnhd", backend=backend)
    assert torch.equal(out, v)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("text_first", [True, False])
def test_image_mode_without_text_identity_returns_v(backend, text_first):
    # No text tokens: an image query's perturbed map only has its own key, so P v = v.
    q, k, v = make_qkv(1, 2, 37, 40, seed=7)
    out = perturbed_attention(q, k, v, 1.0, mode="image", n_text=0, text_first=text_first, backend=backend)
    torch.testing.assert_close(out, v, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("text_first", [True, False])
def test_image_mode_all_text_is_never_perturbed(backend, text_first):
    # Text rows of P equal A: with every token text, any u gives plain attention.
    q, k, v = make_qkv(2, 3, 23, 40, seed=12)
    plain = perturbed_attention(q, k, v, 0.0, mode="image", n_text=23, text_first=text_first, backend=backend)
    out = perturbed_attention(q, k, v, mixed_u(2, 3), mode="image", n_text=23, text_first=text_first, backend=backend)
    torch.testing.assert_close(out, plain, **{"atol": 1e-6, "rtol": 1e-6})
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_matches(plain, sdpa, q.dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_outputs_are_linear_in_u(backend):
    # out(u) = (1 - u) out(0) + u out(1) for every pair, in both modes.
    q, k, v = make_qkv(1, 3, 21, 64, seed=13)
    for mode in ("joint", "image"):
        kw = dict(mode=mode, n_text=5, text_first=False, backend=backend)
        o0, o1 = perturbed_attention(q, k, v, 0.0, **kw), perturbed_attention(q, k, v, 1.0, **kw)
        u = torch.tensor([[0.2, 0.5, 0.9]])
        w = u[0][None, :, None, None]
        blended = perturbed_attention(q, k, v, u, **kw)
        torch.testing.assert_close(blended, (1 - w) * o0 + w * o1, **{"atol": 1e-5, "rtol": 1e-5})
        assert (o0 - o1).abs().max() > 1e-2, "u must matter"


# ---------------------------------------------------------------------------------------------------------------
# The oracle itself against the definition out = ((1 - u) A + u P) v, written out row by row.


def _hand_oracle(q, k, v, u, mode, n_text, text_first, scale):
    """(B, H, N, D) float64 loops: out_i = ((1 - u) A_i + u P_i) v, P = I (joint) or the image-masked softmax."""
    B, H, N, D = q.shape
    is_text = [(i < n_text) if text_first else (i >= N - n_text) for i in range(N)]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                s = torch.stack([(q[b, h, i] * k[b, h, j]).sum() * scale for j in range(N)])
                a = torch.exp(s - s.max())
                a = a / a.sum()
                if mode == "joint":
                    p = torch.zeros(N, dtype=q.dtype)
                    p[i] = 1.0
                elif is_text[i]:
                    p = a
                else:
                    allowed = torch.tensor([is_text[j] or j == i for j in range(N)])
                    e = torch.where(allowed, torch.exp(s - s[allowed].max()), torch.zeros((), dtype=q.dtype))
                    p = e / e.sum()
                w = float(u[b][h])
                out[b, h, i] = ((1 - w) * a + w * p) @ v[b, h]
    return out


@pytest.mark.parametrize("mode, n_text, text_first", [("joint", 0, False), ("image", 3, True), ("image", 3, False), ("image", 0, False), ("image", 7, True)])
def test_reference_matches_the_definition(mode, n_text, text_first):
    q, k, v = make_qkv(2, 2, 7, 5, dtype=torch.float64, seed=21)
    # u is held in float32 by every backend and the oracle: use values float32 represents exactly.
    u = [[0.0, 1.0], [0.375, 1.0]]
    scale = 0.7
    ref = reference_attention(q, k, v, u, mode=mode, n_text=n_text, text_first=text_first, scale=scale)
    torch.testing.assert_close(ref, _hand_oracle(q, k, v, u, mode, n_text, text_first, scale), atol=1e-12, rtol=1e-12)
    # The layout argument of the oracle itself: bnhd input gives the transposed result.
    ref_bnhd = reference_attention(*(t.transpose(1, 2) for t in (q, k, v)), u, layout="bnhd", mode=mode, n_text=n_text, text_first=text_first, scale=scale)
    torch.testing.assert_close(ref_bnhd, ref.transpose(1, 2), atol=1e-12, rtol=1e-12)


def test_tolerances_cover_every_supported_dtype():
    from headpag.kernels.validation import DTYPES

    assert set(TOLERANCES) == set(DTYPES)
    for atol, rtol in TOLERANCES.values():
        assert 0 < atol < 0.05 and 0 < rtol < 0.05 and math.isfinite(atol)


def test_launcher_stride_rules():
    """The kernel indexes the head dim without a stride and marks row offsets as multiples of STRIDE_MULTIPLE."""
    from headpag.kernels.triton_kernel import stride_multiple, unit_stride_head_dim

    assert stride_multiple([19 * 64, 64, 4096]) == 16  # what the JIT's own specialisation would say
    assert stride_multiple([24 * 40, 40, 8]) == 8  # head dim 40: rows still 16-byte aligned in fp16
    assert stride_multiple([72, 9]) == 1
    strided = torch.randn(2, 3, 5, 16)[..., ::2]
    copied = unit_stride_head_dim(strided)
    assert copied.stride(-1) == 1 and torch.equal(copied, strided)
    packed = torch.randn(2, 5, 3, 3, 8).unbind(2)[0]  # a packed-qkv view: unit stride already, kept as is
    assert unit_stride_head_dim(packed) is packed
