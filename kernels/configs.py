"""Launch configurations of the fused kernel per (GPU arch, padded head dim, mode).

Four tables: sm_80 (Ampere and Ada: ``mma.sync``), sm_90 (Hopper: ``wgmma``), sm_100 (datacenter Blackwell:
``tcgen05`` with its accumulators in tensor memory) and sm_120 (consumer Blackwell: ``mma.sync``, 99 KiB of shared
memory per block). Each arch uses the table of the largest of these at or below it (:func:`configs_for`).

One table serves the autotuner (``triton_kernel.py``) and the ahead-of-time compile check (``aot.py``), so
every config that can run on a GPU is compiled and checked for spills in CI. Pure data: imports neither
torch nor triton.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import MODES

ARCHS = (80, 90, 100, 120)
PADDED_HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = PADDED_HEAD_DIMS[-1]
# Head dims diffusers' models use (SD1.x 40/80/160, DiT/PixArt 72, SD3/Flux 64/128, ...) plus the small padded
# sizes; aot.py compiles every one of them.
MODEL_HEAD_DIMS = (40, 64, 72, 80, 96, 128, 160, 256)
COMPILED_HEAD_DIMS = (16, 32) + MODEL_HEAD_DIMS


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

# Chosen with `python -m headpag.kernels.aot`: every config here compiles without register spills on its arch with
# its key loop software-pipelined (two stages: the next K and V tiles load by cp.async while the current ones are
# used), on each triton of the supported stacks (3.6 and 3.9; README "Supported stacks"), so one table serves both.
# Joint mode keeps one fp32 accumulator of BLOCK_M x BLOCK_D; image mode keeps two (full and perturbed softmax),
# hence its smaller tiles at large head dims.
_SMALL_D_JOINT = (C(64, 64, 4, 2), C(128, 64, 8, 2), C(64, 64, 8, 2))
_JOINT = {
    80: {16: (C(64, 64, 4, 2), C(128, 64, 8, 2)),  # M64-N64-w8 spills 4 bytes at head dim 16
         32: _SMALL_D_JOINT, 64: _SMALL_D_JOINT,
         128: (C(64, 64, 8, 2), C(128, 64, 8, 2)),
         # M32-N16-w4 spills 8 bytes at head dim 160; M16-N16-w4 4 bytes there on triton 3.6 (kept for masks)
         256: (C(32, 32, 8, 2),)},
    90: {16: _SMALL_D_JOINT, 32: _SMALL_D_JOINT, 64: _SMALL_D_JOINT,
         128: (C(64, 64, 8, 2),),  # M128-N64-w8 spills 4 bytes at head dims 72/80/96 on sm_90
         256: (C(32, 32, 8, 2), C(16, 16, 4, 2))},
}
_SMALL_D_IMAGE_80 = (C(64, 64, 8, 2), C(128, 64, 8, 2), C(128, 32, 8, 2))
_SMALL_D_IMAGE_90 = (C(64, 64, 8, 2), C(64, 64, 4, 2))
_IMAGE = {
    80: {16: _SMALL_D_IMAGE_80, 32: _SMALL_D_IMAGE_80,
         64: (C(64, 64, 8, 2), C(128, 32, 8, 2)),  # M128-N64-w8 spills 96 bytes at head dim 40 (bf16)
         128: (C(32, 32, 8, 2), C(64, 16, 8, 2), C(32, 16, 4, 2)),  # M64-N32-w8 spills 4 bytes on triton 3.6
         256: (C(16, 16, 4, 2), C(32, 16, 8, 2))},  # M16-N16-w8 spills 20-30 bytes (bf16)
    90: {16: _SMALL_D_IMAGE_90, 32: _SMALL_D_IMAGE_90, 64: _SMALL_D_IMAGE_90,
         128: (C(32, 32, 8, 2),),
         256: (C(16, 16, 8, 2),)},  # M16-N16-w4 spills 8 bytes
}

# Blackwell. sm_100's tcgen05 MMAs keep their accumulators in tensor memory, so 128-row tiles fit in registers where
# sm_90 spills (joint M128-N64-w8 at head dim 128: 180 registers, no spills); with four warps a 128-row tile spills
# (M128-N64-w4 spill stores: 248 bytes at head dim 128 in joint mode, 1732 at head dim 64 in image mode). sm_120
# issues the same mma.sync as sm_80 with 99 KiB of shared memory, so it starts from sm_80's tiles.
_SMALL_D_JOINT_100 = (C(128, 128, 8, 2), C(128, 64, 8, 2), C(64, 64, 4, 2))
_JOINT[100] = {16: _SMALL_D_JOINT_100, 32: _SMALL_D_JOINT_100, 64: _SMALL_D_JOINT_100,
               128: (C(128, 64, 8, 2), C(128, 64, 8, 3)),  # M128-N128-w8: 240 registers
               # M128-N32-w8 spills 16 bytes on triton 3.6, M128-N128-w8 52 and M64-N64-w4 32 on 3.9
               256: (C(64, 64, 8, 2),)}
_IMAGE[100] = {16: (C(64, 64, 8, 2), C(128, 32, 8, 2)),
               32: (C(64, 64, 8, 2),),  # M128-N32-w8 spills 4 bytes on triton 3.6
               64: (C(64, 64, 8, 2), C(128, 32, 8, 2)),
               128: (C(64, 64, 8, 2), C(128, 32, 8, 2)),  # M128-N64-w8 spills 76 bytes at head dim 72
               256: (C(32, 32, 8, 2),)}  # M16-N16-w4 spills 4 bytes at head dim 160
_JOINT[120] = {**_JOINT[80],
               32: (C(64, 64, 4, 2),),  # M128-N64-w8 and M64-N64-w8 spill 4-12 bytes on triton 3.6
               256: (C(32, 32, 4, 2), C(32, 16, 8, 2))}  # M32-N32-w8 spills 4 bytes at head dim 160 on triton 3.6
_IMAGE[120] = {**_IMAGE[80],
               64: (C(128, 32, 8, 2), C(64, 32, 8, 2)),  # M64-N64-w8 spills 88 bytes
               256: (C(32, 16, 8, 2),)}  # M16-N16-w4 spills 16 bytes on triton 3.6


# Masked launches (BIAS_KIND 1: one mask bias per key, 2: one per query-key pair) load the bias tile too and need
# more registers: the configs above minus those that spill with that mask, plus a replacement where none is left.
_MASKED_SPILLS = {  # (arch, mode, block_d, bias kind) -> configs that spill there (on triton 3.6 or 3.9)
    (80, "joint", 32, 2): {C(64, 64, 4, 2)},
    (80, "joint", 64, 1): {C(64, 64, 4, 2)},
    (80, "joint", 64, 2): {C(64, 64, 4, 2)},
    (80, "joint", 128, 2): {C(128, 64, 8, 2)},
    (80, "joint", 256, 1): {C(32, 32, 8, 2)},
    (80, "joint", 256, 2): {C(32, 32, 8, 2)},
    (80, "image", 16, 1): {C(128, 32, 8, 2)},
    (80, "image", 16, 2): {C(128, 64, 8, 2), C(64, 64, 8, 2)},
    (80, "image", 32, 2): {C(128, 64, 8, 2), C(64, 64, 8, 2)},
    (80, "image", 64, 1): {C(64, 64, 8, 2)},
    (80, "image", 64, 2): {C(128, 32, 8, 2), C(64, 64, 8, 2)},
    (90, "joint", 256, 1): {C(32, 32, 8, 2)},
    (90, "image", 16, 2): {C(64, 64, 4, 2)},
    (90, "image", 32, 2): {C(64, 64, 4, 2)},
    (90, "image", 64, 2): {C(64, 64, 4, 2)},
    (90, "image", 256, 1): {C(16, 16, 8, 2)},
    (100, "joint", 16, 2): {C(128, 128, 8, 2)},
    (100, "joint", 32, 2): {C(128, 128, 8, 2)},
    (100, "joint", 64, 2): {C(128, 128, 8, 2)},
    (100, "joint", 128, 1): {C(128, 64, 8, 3)},
    (100, "image", 128, 2): {C(128, 32, 8, 2)},
    (120, "joint", 32, 2): {C(64, 64, 4, 2)},
    (120, "joint", 128, 1): {C(64, 64, 8, 2)},
    (120, "joint", 128, 2): {C(128, 64, 8, 2), C(64, 64, 8, 2)},
    (120, "image", 16, 2): {C(128, 64, 8, 2), C(64, 64, 8, 2)},
    (120, "image", 32, 2): {C(128, 64, 8, 2), C(64, 64, 8, 2)},
    (120, "image", 64, 2): {C(128, 32, 8, 2), C(64, 32, 8, 2)},
    (120, "image", 128, 2): {C(64, 16, 8, 2)},
}
_MASKED_EXTRA = {
    (80, "joint", 256, 1): (C(16, 16, 4, 2),),
    (80, "joint", 256, 2): (C(16, 16, 4, 2),),
    (80, "image", 64, 2): (C(64, 32, 8, 2),),
    (90, "image", 256, 1): (C(32, 16, 8, 2),),  # M16-N16-w4 spills 4-8 bytes at head dim 256 on triton 3.9
    (120, "joint", 32, 2): (C(64, 32, 4, 2),),
    (120, "joint", 128, 2): (C(32, 32, 8, 2),),  # M64-N32-w8 spills 16 bytes there on triton 3.6
    (120, "image", 64, 2): (C(32, 32, 8, 2),),  # M64-N32-w4 spills 124-128 bytes there
}
BIAS_KINDS = (0, 1, 2)


def padded_head_dim(D: int) -> int:
    """The power-of-two tile width that holds a head dim of ``D`` (masked beyond ``D``)."""
    if D < 1 or D > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}] for the Triton kernel, got {D}")
    return next(p for p in PADDED_HEAD_DIMS if p >= D)


def configs_for(arch: int, block_d: int, mode: str, bias_kind: int = 0) -> tuple[KernelConfig, ...]:
    """Autotuning candidates for compute capability ``arch``, a padded head dim, a mode and the kernel's
    ``BIAS_KIND`` (0: no mask). ``arch`` takes the table of the largest of :data:`ARCHS` at or below it: 86 / 89
    (Ampere, Ada) sm_80's, 90 sm_90's, 100 / 103 / 110 sm_100's, 120 / 121 sm_120's; below 80, sm_80's."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if bias_kind not in BIAS_KINDS:
        raise ValueError(f"bias_kind must be one of {BIAS_KINDS}, got {bias_kind!r}")
    tables = _IMAGE if mode == "image" else _JOINT
    table_arch = max(a for a in ARCHS if a <= arch) if arch >= ARCHS[0] else ARCHS[0]
    table = tables[table_arch]
    if block_d not in table:
        raise ValueError(f"block_d must be one of {tuple(table)}, got {block_d}")
    if bias_kind == 0:
        return table[block_d]
    key = (table_arch, mode, block_d, bias_kind)
    spills = _MASKED_SPILLS.get(key, set())
    return tuple(c for c in table[block_d] if c not in spills) + _MASKED_EXTRA.get(key, ())
