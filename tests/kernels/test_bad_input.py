"""Every bad argument raises ValueError / TypeError naming that argument; nothing is clamped or coerced."""

from __future__ import annotations

import math

import pytest
import torch

from headpag.kernels import perturbed_attention, reference_attention
from headpag.kernels import triton_kernel as triton_kernel_module
from support.qkv import make_qkv

B, H, N, D = 2, 3, 17, 32


@pytest.fixture
def qkv():
    return make_qkv(B, H, N, D, seed=1)


def call(q, k, v, u=0.5, **kwargs):
    return perturbed_attention(q, k, v, u, **kwargs)


# --- q, k, v ---------------------------------------------------------------------------------------------------


def test_shape_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"^k shape differs from q"):
        call(q, k[..., :16], v)
    with pytest.raises(ValueError, match=r"^v shape differs from q"):
        call(q, k, v[:, :2])


def test_sequence_length_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"^k sequence length differs from q"):
        call(q, k[:, :, :9], v)
    qb, kb, vb = (t.transpose(1, 2) for t in qkv)  # bnhd: the sequence is dim 1
    with pytest.raises(ValueError, match=r"^v sequence length differs from q"):
        call(qb, kb, vb[:, :9], layout="bnhd")


def test_wrong_rank(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"^q must be 4-D \(B, N, H, D\) for layout='bnhd'"):
        call(q[0], k[0], v[0], layout="bnhd")


def test_not_a_tensor(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"^k must be a torch.Tensor, got list"):
        call(q, k.tolist(), v)


def test_empty_dimension():
    q, k, v = (torch.empty(B, H, 0, D),) * 3
    with pytest.raises(ValueError, match="empty dimension"):
        call(q, k, v)


def test_device_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"^k is on meta but q is on cpu"):
        call(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"^v is on meta but q is on cpu"):
        call(q, k, v.to("meta"))


def test_dtype_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"^v.dtype torch.float16 differs from q.dtype torch.float32"):
        call(q, k, v.half())


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn, torch.complex64])
def test_unsupported_dtype(qkv, dtype):
    q, k, v = (t.to(dtype) for t in qkv)
    with pytest.raises(TypeError, match=rf"^q.dtype must be one of .* got {dtype}"):
        call(q, k, v)


@pytest.mark.parametrize("layout", ["bshd", "BHND", "", None])
def test_unknown_layout(qkv, layout):
    with pytest.raises(ValueError, match=r"^layout must be one of \('bhnd', 'bnhd'\)"):
        call(*qkv, layout=layout)


def test_inputs_that_require_grad_are_rejected(qkv):
    q, k, v = (t.clone().requires_grad_(name == "v") for name, t in zip("qkv", qkv))
    with pytest.raises(ValueError, match="inference only: q, k or v requires grad"):
        call(q, k, v)
    # Under no_grad the same tensors are fine, and the result carries no graph.
    with torch.no_grad():
        out = call(q, k, v, backend="torch")
    assert not out.requires_grad


# --- u ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "u",
    [
        -0.5,
        1.5,
        1.0000001,  # just above 1: not clamped
        -1e-30,  # just below 0: not clamped
        [0.0, 1.0, 2.0],
        torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0 + 1e-9]], dtype=torch.float64),
        torch.tensor(-1),
        math.inf,
    ],
    ids=["-0.5", "1.5", "1+1e-7", "-1e-30", "list-2", "f64-1+1e-9", "int-minus-1", "inf"],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_u_outside_unit_interval(qkv, u, backend):
    with pytest.raises(ValueError, match=r"^u must be in \[0, 1\]"):
        call(*qkv, u, backend=backend)
    with pytest.raises(ValueError, match=r"^u must be in \[0, 1\]"):
        reference_attention(*qkv, u)


@pytest.mark.parametrize("u", [math.nan, [0.5, math.nan, 0.5], torch.tensor([[0.0, 0.5, 1.0], [0.0, math.nan, 1.0]])])
def test_u_nan(qkv, u):
    with pytest.raises(ValueError, match=r"^u must be in \[0, 1\], got NaN"):
        call(*qkv, u)


@pytest.mark.parametrize("u", [[0.5, 0.5], torch.zeros(B, H + 1), torch.zeros(B + 1, H), torch.zeros(1, B, H), torch.zeros(H, B)])
def test_u_wrong_broadcast_shape(qkv, u):
    with pytest.raises(ValueError, match=rf"^u must broadcast to \(B, H\) = \({B}, {H}\)"):
        call(*qkv, u)


@pytest.mark.parametrize("u", [True, "0.5", None, torch.tensor([1, 0, 1], dtype=torch.bool), torch.zeros(3, dtype=torch.complex64), {"a": 1}])
def test_u_wrong_type(qkv, u):
    with pytest.raises(TypeError, match=r"^u must be"):
        call(*qkv, u)


# --- mode, n_text, text_first ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["text", "Joint", "", None])
def test_unknown_mode(qkv, mode):
    with pytest.raises(ValueError, match=r"^mode must be one of \('joint', 'image'\)"):
        call(*qkv, mode=mode)


@pytest.mark.parametrize("n_text", [-1, N + 1, 10**9])
def test_n_text_outside_range(qkv, n_text):
    with pytest.raises(ValueError, match=rf"^n_text must be in \[0, N={N}\], got {n_text}"):
        call(*qkv, mode="image", n_text=n_text)


@pytest.mark.parametrize("n_text", [2.0, "3", True, torch.tensor(3), None])
def test_n_text_not_an_int(qkv, n_text):
    with pytest.raises(TypeError, match=r"^n_text must be an int"):
        call(*qkv, mode="image", n_text=n_text)


@pytest.mark.parametrize("text_first", [1, 0, "yes", None, torch.tensor(True)])
def test_text_first_not_a_bool(qkv, text_first):
    with pytest.raises(TypeError, match=r"^text_first must be a bool"):
        call(*qkv, mode="image", n_text=3, text_first=text_first)


# --- scale, backend ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0, 0.0, -0.1, math.nan, math.inf, -math.inf])
def test_scale_not_positive_finite(qkv, scale):
    with pytest.raises(ValueError, match=r"^scale must be a positive finite number"):
        call(*qkv, scale=scale)


@pytest.mark.parametrize("scale", ["0.1", True, [0.1]])
def test_scale_wrong_type(qkv, scale):
    with pytest.raises(TypeError, match=r"^scale must be a positive finite number or None"):
        call(*qkv, scale=scale)


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None, "flash"])
def test_unknown_backend(qkv, backend):
    with pytest.raises(ValueError, match=r"^backend must be one of \('auto', 'triton', 'torch'\)"):
        call(*qkv, backend=backend)


def test_triton_rejects_float64(qkv):
    q, k, v = (t.double() for t in qkv)
    with pytest.raises(TypeError, match=r"Triton kernel supports q.dtype .* got float64; use backend='torch'"):
        call(q, k, v, backend="triton")
    assert call(q, k, v, backend="torch").dtype == torch.float64  # the torch path takes it


@pytest.mark.parametrize("head_dim", [257, 300])
def test_triton_rejects_head_dims_above_256(head_dim):
    q, k, v = make_qkv(1, 1, 3, head_dim)
    with pytest.raises(ValueError, match=rf"^head dim must be in \[1, 256\] for the Triton kernel, got {head_dim}"):
        call(q, k, v, backend="triton")
    assert call(q, k, v, backend="torch").shape == q.shape  # the torch path takes it


def test_triton_on_cpu_without_the_interpreter(qkv, monkeypatch):
    monkeypatch.setattr(triton_kernel_module, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"^backend='triton' needs CUDA tensors"):
        call(*qkv, backend="triton")


# --- plan ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "tensor"])
def test_plan_that_contradicts_u(qkv, as_tensor):
    u = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]])
    good = [[0, 1, 2], [2, 1, 0]]
    assert call(*qkv, u, plan=torch.tensor(good) if as_tensor else good, backend="torch").shape == qkv[0].shape
    for bad, where in (([[0, 1, 2], [2, 2, 0]], r"\(1, 1\)"), ([[1, 1, 2], [2, 1, 0]], r"\(0, 0\)"), ([[0, 1, 1], [2, 1, 0]], r"\(0, 2\)")):
        plan = torch.tensor(bad) if as_tensor else bad
        with pytest.raises(ValueError, match=rf"^plan contradicts u at \(row, head\) = {where}"):
            call(*qkv, u, plan=plan)
        with pytest.raises(ValueError, match=r"^plan contradicts u"):
            reference_attention(*qkv, u, plan=plan)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "tensor"])
def test_plan_bad_codes_and_shapes(qkv, as_tensor):
    wrap = (lambda p: torch.tensor(p)) if as_tensor else (lambda p: p)
    with pytest.raises(ValueError, match=r"^plan codes must be in"):
        call(*qkv, 0.5, plan=wrap([1, 3, 1]))
    with pytest.raises(ValueError, match=r"^plan codes must be in"):
        call(*qkv, 0.5, plan=wrap(-1))
    with pytest.raises(ValueError, match=rf"^plan must broadcast to \(B, H\) = \({B}, {H}\)"):
        call(*qkv, 0.5, plan=wrap([1, 1]))
    with pytest.raises(ValueError, match=rf"^plan must broadcast to \(B, H\) = \({B}, {H}\)"):
        call(*qkv, 0.5, plan=wrap([[[1, 1, 1]]]))
    with pytest.raises(TypeError, match=r"^plan must hold integer codes"):
        call(*qkv, 0.5, plan=wrap([1.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match=r"^plan must hold integer codes"):
        call(*qkv, 0.5, plan=wrap([True, True, True]))


def test_plan_ragged_or_junk(qkv):
    with pytest.raises(ValueError, match=r"^plan must be a rectangular nested sequence"):
        call(*qkv, 0.5, plan=[[1, 1, 1], [1, 1]])
    with pytest.raises(TypeError, match=r"^plan must"):
        call(*qkv, 0.5, plan="soft")


def test_plan_forms_broadcast_alike(qkv):
    u = torch.tensor([[0.5, 0.0, 1.0], [0.5, 0.0, 1.0]])
    expected = perturbed_attention(*qkv, u, backend="torch")
    for plan in ([1, 0, 2], (1, 0, 2), [[1, 0, 2]], [[1, 0, 2], [1, 0, 2]], torch.tensor([1, 0, 2], dtype=torch.int8), torch.tensor([[1, 0, 2]] * 2)):
        assert torch.equal(perturbed_attention(*qkv, u, plan=plan, backend="torch"), expected), plan
    rows = torch.tensor([[0.5] * H, [1.0] * H])
    for plan in ([[1], [2]], torch.tensor([[1], [2]])):
        assert torch.equal(perturbed_attention(*qkv, rows, plan=plan, backend="torch"), perturbed_attention(*qkv, rows, backend="torch"))
    with pytest.raises(ValueError, match=r"^plan contradicts u at \(row, head\) = \(1, 0\)"):
        perturbed_attention(*qkv, rows, plan=[[1], [1]])


def test_the_op_refuses_codes_of_another_length():
    """The registered op called directly (no public-entry validation): a wrong number of codes raises rather than
    leaving rows of the output unwritten."""
    q, k, v = (torch.randn(2, 3, 8, 16) for _ in range(3))
    u = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"codes must hold B \* H = 6 entries"):
        torch.ops.headpag.perturbed_attention(q, k, v, u, [0] * 5, "bhnd", "joint", 0, False, 0.25, "torch")
