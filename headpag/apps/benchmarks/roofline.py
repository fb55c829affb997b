"""Roofline *projection* (not a measurement) of the time of one guided step on an NVIDIA H100 SXM.

``time = max(FLOPs / peak dense bf16 FLOP/s, bytes / HBM bandwidth)`` with bytes = parameters x 2 (bf16 weights
read once per step; activations are not counted, so the memory side is a lower bound). A step that reaches the
projection would run every matrix product at the tensor cores' peak: measured steps are slower.
"""

from __future__ import annotations

H100_SXM = dict(name="NVIDIA H100 SXM (projection)", bf16_dense_flop_per_s=989e12, hbm_byte_per_s=3.35e12)
NOTE = ("projection, not a measurement: H100 SXM time per guided step = max(FLOPs / 989e12 dense bf16 FLOP/s, "
        "bytes / 3.35e12 B/s), bytes = parameters x 2 (bf16 weights read once per step)")


def project(flops: float, parameters: int, gpu: dict = H100_SXM) -> dict:
    """Projected seconds of a step of ``flops`` FLOPs through a model of ``parameters`` bf16 weights."""
    if flops < 0 or parameters < 0:
        raise ValueError(f"flops and parameters must be >= 0, got flops={flops}, parameters={parameters}")
    compute = flops / gpu["bf16_dense_flop_per_s"]
    memory = parameters * 2 / gpu["hbm_byte_per_s"]
    seconds = max(compute, memory)
    return dict(kind="projection", gpu=gpu["name"], seconds=seconds, ms=seconds * 1e3, compute_bound_s=compute,
                weights_read_s=memory, bound="compute" if compute >= memory else "memory")
