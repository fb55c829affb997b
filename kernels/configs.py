"""Launch configurations of the fused kernel per (GPU arch, padded head dim, mode).

One table serves the autotuner (``triton_kernel.py``) and the ahead-of-time compile check (``aot.py``), so
every config that can run on a GPU is compiled and checked for spills in CI. Pure data: imports neither
torch nor triton.
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = (80, 90)
PADDED_HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = PADDED_HEAD_DIMS[-1]
# Head dims diffusers' models use (SD1.x 40/80/160, DiT/PixArt 72, SD3/Flux 64/128, ...); aot.py compiles their
# padded sizes.
MODEL_HEAD_DIMS = (40, 64, 72, 80, 96, 128, 160, 256)


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"M{self.BLOCK_M}-N{self.BLOCK_N}-w{self.num_warps}-s{self.num_stages}"


# Fixed config under TRITON_INTERPRET=1: the autotuner cannot benchmark there; 16 is tl.dot's minimum.
INTERPRETER_CONFIG = KernelConfig(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)

C = KernelConfig

# Joint mode keeps one fp32 accumulator of BLOCK_M x BLOCK_D; image mode keeps two (full and perturbed
# softmax), hence its smaller tiles. BLOCK_M=128 runs with 8 warps: with 4 it spills on sm_90 at D >= 64.
_JOINT = {
    16: (C(128, 64, 4, 3), C(64, 64, 4, 3), C(128, 128, 8, 3)),
    32: (C(128, 64, 4, 3), C(64, 64, 4, 3), C(128, 128, 8, 3)),
    64: (C(128, 64, 8, 3), C(64, 64, 4, 3), C(128, 128, 8, 3)),
    128: (C(128, 64, 8, 3), C(64, 64, 4, 3), C(128, 32, 8, 4)),
    256: (C(64, 32, 4, 2), C(64, 64, 8, 2), C(128, 32, 8, 2)),
}
_IMAGE = {
    16: (C(64, 64, 4, 3), C(128, 64, 8, 3)),
    32: (C(64, 64, 4, 3), C(128, 64, 8, 3)),
    64: (C(64, 64, 4, 3), C(128, 64, 8, 3)),
    128: (C(64, 64, 4, 3), C(128, 64, 8, 3)),
    256: (C(64, 32, 4, 2), C(64, 32, 8, 2)),
}


def padded_head_dim(D: int) -> int:
    """The power-of-two tile width that holds a head dim of ``D`` (masked beyond ``D``)."""
    if D < 1 or D > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}] for the Triton kernel, got {D}")
    return next(p for p in PADDED_HEAD_DIMS if p >= D)


def configs_for(arch: int, block_d: int, mode: str) -> tuple[KernelConfig, ...]:
    """Autotuning candidates for a GPU of compute capability ``arch`` (80: Ampere, 90: Hopper; others use
    the closest lower table)."""
    table = _IMAGE if mode == "image" else _JOINT
    if block_d not in table:
        raise ValueError(f"block_d must be one of {tuple(table)}, got {block_d}")
    return table[block_d]
