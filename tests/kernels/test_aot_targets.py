"""The compile check's targets: which table each GPU arch tunes from, each target's shared-memory limit, and the
tensor-core instructions read from each target's SASS. (CI's full compile check compiles every config; nothing is
compiled here.)"""

import pytest

from headpag.kernels import aot
from headpag.kernels.configs import ARCHS, BIAS_KINDS, PADDED_HEAD_DIMS, KernelConfig, configs_for
from headpag.kernels.constants import MODES

# One line of each target's SASS, as nvdisasm prints the cubin triton 3.9 builds (joint mode, head dim 64).
SASS = {
    100: "/*16c0*/                   UTCHMMA gdesc[UR6], gdesc[UR8], tmem[UR22], tmem[UR28], idesc[UR29], !UPT ;",
    120: "/*1230*/                   HMMA.16816.F32 R104, R84, R52, RZ ;",
    90: "/*1210*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT ;",
}


@pytest.mark.parametrize("arch, kind", [(100, "UTCHMMA"), (120, "HMMA"), (90, "HGMMA")])
def test_tensor_core_instructions_are_named_per_target(arch, kind):
    other = "/*0100*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R2.64] ;"
    assert aot.mma_instructions("\n".join([other, SASS[arch], SASS[arch], other])) == (2, kind)


def test_sass_without_tensor_cores_counts_none():
    assert aot.mma_instructions("/*0100*/ FFMA R1, R2, R3, R4 ;\n/*0110*/ EXIT ;") == (0, "")


def test_blackwell_targets_are_compiled_by_default():
    assert {100, 120} <= set(ARCHS)
    assert set(aot.SHARED_MEMORY_LIMIT) == set(ARCHS)
    jobs = aot.all_jobs()
    assert {job.arch for job in jobs} == set(ARCHS)


@pytest.mark.parametrize("arch, table", [(86, 80), (89, 80), (90, 90), (100, 100), (103, 100), (110, 100),
                                         (120, 120), (121, 120), (75, 80)])
def test_each_arch_tunes_from_the_table_of_its_family(arch, table):
    for mode in MODES:
        for block_d in PADDED_HEAD_DIMS:
            for bias_kind in BIAS_KINDS:
                assert configs_for(arch, block_d, mode, bias_kind) == configs_for(table, block_d, mode, bias_kind)


def test_every_target_has_configs_for_every_case():
    for arch in ARCHS:
        for mode in MODES:
            for block_d in PADDED_HEAD_DIMS:
                for bias_kind in BIAS_KINDS:
                    assert configs_for(arch, block_d, mode, bias_kind), (arch, mode, block_d, bias_kind)


def test_a_blackwell_result_over_its_shared_memory_fails():
    result = aot.Result(120, "fp16", "joint", 64, 64, "M128-N64-w8-s2", ok=True, shared=aot.SHARED_MEMORY_LIMIT[120] + 1,
                        registers=128, spill_stores=0, spill_loads=0, mma=64, mma_kind="HMMA", async_copies=16)
    assert result.failures == [f"shared memory {aot.SHARED_MEMORY_LIMIT[120] + 1} > 101376"]
    assert aot.Result(**{**result.__dict__, "arch": 100, "mma_kind": "UTCHMMA"}).failures == []


def test_blackwell_targets_tune_from_their_own_tables():
    # sm_100: tcgen05 keeps the accumulator in tensor memory, so 128-row tiles fit where sm_90's table stops at 64.
    assert KernelConfig(128, 64, 8, 2) in configs_for(100, 128, "joint")
    assert KernelConfig(128, 64, 8, 2) not in configs_for(90, 128, "joint")
    # sm_120: sm_80's image tile M64-N64-w8 spills 88 bytes at head dims 40 / 64 there.
    assert KernelConfig(64, 64, 8, 2) in configs_for(80, 64, "image")
    assert KernelConfig(64, 64, 8, 2) not in configs_for(120, 64, "image")


@pytest.mark.parametrize("arch, config, kind, ok", [
    (100, "M128-N64-w8-s2", "UTCHMMA", True), (100, "M128-N64-w8-s2", "HMMA", False),
    (100, "M32-N32-w8-s2", "HMMA", True), (90, "M64-N64-w4-s2", "HGMMA", True), (90, "M64-N64-w4-s2", "HMMA", False),
    (90, "M32-N32-w8-s2", "HMMA", True), (80, "M128-N64-w8-s2", "HMMA", True), (120, "M128-N64-w8-s2", "HMMA", True),
])
def test_a_large_tile_without_its_targets_mma_fails(arch, config, kind, ok):
    result = aot.Result(arch, "fp16", "joint", 64, 64, config, ok=True, shared=32768, registers=128, spill_stores=0,
                        spill_loads=0, mma=16, mma_kind=kind, async_copies=16)
    assert (result.failures == []) is ok, result.failures
