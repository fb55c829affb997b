"""``torch.ops.headpag.perturbed_attention`` as a custom op: traced by ``torch.compile`` without graph breaks
(``fullgraph=True`` turns any break into an error) and sound by ``torch.library.opcheck``."""

from __future__ import annotations

import pytest
import torch

from headpag.kernels import perturbed_attention
from support.qkv import make_qkv
from support.tolerances import assert_matches

OP = torch.ops.headpag.perturbed_attention

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def recording_backend(graphs: list):
    """A torch.compile backend that keeps every FX graph it is given, then runs it like aot_eager."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def targets(gm) -> list:
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


CASES = [
    # (layout, mode, n_text, text_first, u, plan)
    ("bhnd", "joint", 0, False, [[0.0, 0.5, 1.0], [1.0, 0.0, 0.25]], [[0, 1, 2], [2, 0, 1]]),
    ("bnhd", "joint", 0, False, [1.0, 1.0, 1.0], 2),
    ("bhnd", "image", 5, True, [[0.0, 0.5, 1.0], [1.0, 0.0, 0.25]], [[0, 1, 2], [2, 0, 1]]),
    ("bnhd", "image", 6, False, [0.0, 1.0, 0.75], [0, 2, 1]),
]


@pytest.mark.parametrize("layout, mode, n_text, text_first, u_host, plan", CASES)
def test_compile_fullgraph_matches_eager(layout, mode, n_text, text_first, u_host, plan):
    B, H, N, D = 2, 3, 23, 40
    q, k, v = make_qkv(B, H, N, D, layout=layout, variant="permuted", seed=1)
    u = torch.as_tensor(u_host, dtype=torch.float32)

    def f(q, k, v, u):
        out = perturbed_attention(q, k, v, u, layout=layout, mode=mode, n_text=n_text, text_first=text_first, backend="torch", plan=plan)
        return out * 2 + 1  # something around the op, so the graph is more than the op alone

    eager = f(q, k, v, u)
    graphs: list = []
    compiled = torch.compile(f, fullgraph=True, backend=recording_backend(graphs))
    out = compiled(q, k, v, u)
    assert torch.equal(out, eager)
    # One graph, holding the custom op itself (not a decomposition of it, nor a fallback to Python).
    assert len(graphs) == 1
    assert sum(t in (OP, OP.default) for t in targets(graphs[0])) == 1
    # The traced graph is reused for new values of the same shapes (u's values are not baked in).
    q2, k2, v2 = make_qkv(B, H, N, D, layout=layout, variant="permuted", seed=2)
    assert torch.equal(compiled(q2, k2, v2, u), f(q2, k2, v2, u))
    assert len(graphs) == 1
    # And the eager result is the right one.
    ref_u = u.expand(B, H) if u.dim() < 2 else u
    from headpag.kernels import reference_attention

    ref = reference_attention(q.double(), k.double(), v.double(), ref_u, layout=layout, mode=mode, n_text=n_text, text_first=text_first)
    assert_matches((eager - 1) / 2, ref, torch.float32)


def test_compile_inductor_fullgraph():
    B, H, N, D = 2, 3, 19, 32
    q, k, v = make_qkv(B, H, N, D, seed=3)
    u = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]])
    plan = [[0, 1, 2], [2, 1, 0]]

    def f(q, k, v, u):
        joint = perturbed_attention(q, k, v, u, backend="torch", plan=plan)
        image = perturbed_attention(q, k, v, u, mode="image", n_text=4, text_first=True, backend="torch", plan=plan)
        return joint + image.sin()

    out = torch.compile(f, fullgraph=True, backend="inductor")(q, k, v, u)
    torch.testing.assert_close(out, f(q, k, v, u), atol=1e-6, rtol=1e-6)


def test_compile_with_a_scalar_u_and_plan():
    q, k, v = make_qkv(1, 2, 17, 32, seed=4)

    def f(q, k, v):
        return perturbed_attention(q, k, v, 0.5, backend="torch", plan=1)

    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v), f(q, k, v))


# ---------------------------------------------------------------------------------------------------------------


def opcheck_samples():
    u = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.25]])
    plan = [0, 1, 2, 2, 0, 1]
    q, k, v = make_qkv(2, 3, 17, 16, seed=5)
    qp, kp, vp = make_qkv(2, 3, 17, 16, layout="bnhd", variant="permuted", seed=6)
    qh, kh, vh = make_qkv(2, 3, 9, 40, layout="bnhd", variant="packed", dtype=torch.float16, seed=7)
    return [
        ((q, k, v, u, plan, "bhnd", "joint", 0, False, 0.25, "torch"), "torch-joint-bhnd"),
        ((q, k, v, u, plan, "bhnd", "image", 5, True, 0.25, "torch"), "torch-image-bhnd"),
        ((qp, kp, vp, u, plan, "bnhd", "image", 4, False, 0.3, "torch"), "torch-image-bnhd-permuted"),
        ((qh, kh, vh, u, plan, "bnhd", "joint", 0, False, 0.15, "torch"), "torch-joint-fp16-packed"),
        ((q, k, v, u, plan, "bhnd", "image", 5, False, 0.25, "triton"), "triton-image-bhnd"),
    ]


@pytest.mark.parametrize("args", [a for a, _ in opcheck_samples()], ids=[i for _, i in opcheck_samples()])
def test_opcheck(args):
    result = torch.library.opcheck(OP.default, args)
    assert set(result.values()) == {"SUCCESS"}, result
    assert {"test_schema", "test_faketensor", "test_aot_dispatch_dynamic"} <= set(result)


def test_fake_output_matches_real_output_metadata():
    # Shape, dtype and strides of the fake (meta) result equal the real one's (contiguous in q's layout).
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = make_qkv(2, 3, 17, 16, layout="bnhd", variant="permuted", seed=8)
    u = torch.full((2, 3), 0.5)
    real = OP(q, k, v, u, [1] * 6, "bnhd", "image", 3, True, 0.25, "torch")
    with FakeTensorMode() as mode:
        fake = OP(*(mode.from_tensor(t) for t in (q, k, v, u)), [1] * 6, "bnhd", "image", 3, True, 0.25, "torch")
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
