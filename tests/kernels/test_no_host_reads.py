"""The fused path never reads ``u`` back to the host: on a GPU each read would make the host wait for the device
(a synchronisation per selected layer per step). Host reads are counted on CPU tensors with a
``TorchFunctionMode`` that records every Tensor method that copies values to Python or to the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import headpag
import headpag.guided.hooks
from support import models as P
from headpag.kernels import perturbed_attention, perturbed_attention_from_plan
from headpag.kernels.validation import prepare_u

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}


class HostReads(TorchFunctionMode):
    """Records host reads: the methods above, and ``Tensor.to`` towards the CPU."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        targets = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, (str, torch.device))]
        if name in HOST_READS or (name == "to" and any(torch.device(t).type == "cpu" for t in targets)):
            self.calls.append(name)
        return func(*args, **kwargs)


def _qkvu():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    u = torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.25]])
    plan = [[0, 2, 1], [0, 0, 1]]
    return q, k, v, u, plan


@pytest.mark.parametrize("mode,n_text", [("joint", 0), ("image", 3)])
def test_from_plan_reads_nothing_and_equals_the_checked_op(mode, n_text):
    q, k, v, u, plan = _qkvu()
    kw = dict(mode=mode, n_text=n_text, backend="torch")
    with HostReads() as reads:
        out = perturbed_attention_from_plan(q, k, v, u, plan=plan, **kw)
    assert reads.calls == []
    torch.testing.assert_close(out, perturbed_attention(q, k, v, u, plan=plan, **kw), atol=0, rtol=0)
    with HostReads() as reads:  # the checked entry reads u (once, to the host) to validate it: the control
        perturbed_attention(q, k, v, u, plan=plan, **kw)
    assert reads.calls


def test_from_plan_checks_what_it_can_without_reading():
    q, k, v, u, plan = _qkvu()
    for bad_u, what in ((u.double(), "float64"), (u[:1], "(1, 3)"), (0.5, "0.5"), (u.to("meta"), "meta")):
        with pytest.raises(ValueError, match=rf"u must be a float32 \(B, H\) = \(2, 3\) tensor on cpu, got .*{what}"):
            perturbed_attention_from_plan(q, k, v, bad_u, plan=plan)
    with pytest.raises(ValueError, match="plan is required"):
        perturbed_attention_from_plan(q, k, v, u, plan=None)
    with pytest.raises(ValueError, match="plan codes must be in"):
        perturbed_attention_from_plan(q, k, v, u, plan=[[0, 3, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match="mode must be"):
        perturbed_attention_from_plan(q, k, v, u, plan=plan, mode="text")


def test_prepare_u_returns_one_host_copy():
    device_u, host = prepare_u([0.0, 1.0, 0.5], 2, 3, torch.device("cpu"))
    assert device_u.dtype == torch.float32 and device_u.shape == (2, 3) and device_u.is_contiguous()
    assert host.dtype == torch.float64 and host.device.type == "cpu" and host[1].tolist() == [0.0, 1.0, 0.5]
    meta_u, meta_host = prepare_u(torch.zeros(3, device="meta"), 2, 3, torch.device("meta"))
    assert meta_u.device.type == "meta" and meta_host is None
    with pytest.raises(ValueError, match=r"u must be in \[0, 1\], got values in \[0.0, 1.5\]"):
        prepare_u([0.0, 1.5, 0.5], 2, 3, torch.device("cpu"))


def test_fused_pipeline_attention_reads_nothing(monkeypatch):
    """Every attention call a fused SD3 step routes to the kernel entry runs without a host read."""
    reads, calls = [], []

    def watched(*args, **kwargs):
        with HostReads() as mode:
            out = perturbed_attention_from_plan(*args, **kwargs)
        reads.extend(mode.calls)
        calls.append(kwargs["plan"])
        return out

    monkeypatch.setattr(headpag.guided.hooks, "perturbed_attention_from_plan", watched)
    pipe = P.sd3()
    headpag.enable_fused(pipe, "1:0,2:1@0.5", scale=2.0)
    P.run(pipe, P.sd3_inputs())
    headpag.disable(pipe)
    assert calls and reads == []
    assert any(2 in row for plan in calls for row in plan) and any(1 in row for plan in calls for row in plan)
