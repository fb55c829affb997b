"""The one place for the tests' tolerances: the kernel's per dtype, the pipelines' per kind of comparison.

Kernel outputs are compared with the float64 ``reference_attention`` computed from the *same* (already rounded)
inputs, so those tolerances only cover the backend's own arithmetic in that dtype. Pipeline outputs are compared
with diffusers' own PAG pipelines, the eager oracle or a reference built from diffusers' hooks.
"""

from __future__ import annotations

import torch

# --- kernels --------------------------------------------------------------------------------------------------
# dtype -> (atol, rtol), for |out - ref| <= atol + rtol * |ref| with ref in float64.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``atol`` / ``rtol`` keyword arguments for ``torch.testing.assert_close`` at ``dtype``."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """``out`` (any dtype) equals the float64 ``ref`` within ``dtype``'s tolerance."""
    torch.testing.assert_close(out.to(torch.float64), ref.to(torch.float64), **tolerance(dtype), msg=msg or None)


# --- pipelines ------------------------------------------------------------------------------------------------
# torch.testing.assert_close(actual, expected, atol=atol * max(1, max|expected|), rtol=rtol) on float32 copies
# (atol not scaled for the kinds in UNSCALED).
TOL = {
    # fp32 pipelines against diffusers' PAG pipelines (observed max |diff| <= 1.1e-6 * scale)
    "peer": dict(atol=5e-5, rtol=5e-5),
    # fp32 fused vs eager, or vs a reference built from diffusers' hooks/processors (observed <= 1.8e-6 * scale)
    "fp32": dict(atol=5e-5, rtol=5e-5),
    # fp32 fused vs eager on the families with extra per-row inputs (ControlNet, Flux, PixArt, DiT), an absolute
    # bound (PixArt's outputs are O(50), covered by the relative one)
    "families": dict(atol=1e-4, rtol=1e-4),
    # the whole pipeline in bfloat16 on CPU, fused vs eager: different rounding orders, amplified over the steps
    # (observed max |fused - eager| = 1.3% (SD3) and 2.1% (SD1.5) of max |output|; bf16 itself moves the fp32
    # result by 30-45% of the guidance effect's norm, fused and eager alike)
    "bf16": dict(atol=4e-2, rtol=4e-2),
    # torch.compile(inductor) of the patched denoiser vs the same patched denoiser uncompiled (fp32)
    "compile": dict(atol=5e-5, rtol=5e-5),
}
UNSCALED = {"families"}
# A guided output must differ from the plain one by more than this (so that no comparison is vacuous).
MIN_EFFECT = 1e-3


def close(actual: torch.Tensor, expected: torch.Tensor, kind: str, msg: str = "") -> None:
    """``assert_close`` with ``TOL[kind]``; ``atol`` is relative to the output's scale, ``max(1, max |expected|)``
    (Euler-scheduled SDXL latents reach ~300 after two steps of a random UNet), except for ``UNSCALED`` kinds."""
    expected = expected.float()
    scale = 1.0 if kind in UNSCALED else max(1.0, float(expected.abs().max()))
    tol = dict(TOL[kind], atol=TOL[kind]["atol"] * scale)
    torch.testing.assert_close(actual.float(), expected, **tol, msg=(lambda m: f"{msg}\n{m}") if msg else None)

