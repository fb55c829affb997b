"""The compile check's result cache (``python -m headpag.kernels.aot --cache DIR``): a stored result is read back
for exactly the job, triton and kernel source it was made with. (Compiling itself is what CI's full compile check
exercises; nothing is compiled here.)"""

import json
from dataclasses import asdict, replace

from headpag.kernels import aot
from headpag.kernels.configs import KernelConfig

JOB = aot.Job(80, "fp16", "joint", 64, KernelConfig(64, 64, 4, 2), 0)


def _stored(tmp_path, job, **fields):
    result = aot.Result(job.arch, job.dtype, job.mode, job.head_dim, 64, str(job.config), ok=True, shared=32768,
                        registers=168, spill_stores=0, spill_loads=0, mma=64, mma_kind="HMMA", async_copies=20,
                        **fields)
    (tmp_path / f"{aot.cache_key(job)}.json").write_text(json.dumps(asdict(result)))
    return result


def test_a_cached_job_is_read_back_not_compiled(tmp_path):
    stored = _stored(tmp_path, JOB)
    [result] = aot.run([JOB], workers=1, cache=str(tmp_path))  # a compile would need ptxas and seconds
    assert result == replace(stored, cached=True)
    assert not result.failures


def test_the_key_depends_on_the_job_triton_and_kernel_source(tmp_path, monkeypatch):
    import triton

    key = aot.cache_key(JOB)
    assert aot.cache_key(aot.Job(80, "fp16", "joint", 64, KernelConfig(64, 64, 4, 2), 0)) == key
    for other in (replace(JOB, arch=90), replace(JOB, dtype="bf16"), replace(JOB, mode="image"),
                  replace(JOB, head_dim=40), replace(JOB, config=KernelConfig(64, 64, 8, 2)), replace(JOB, bias_kind=1)):
        assert aot.cache_key(other) != key, other
    monkeypatch.setattr(triton, "__version__", triton.__version__ + ".other")
    assert aot.cache_key(JOB) != key
    monkeypatch.undo()

    source = tmp_path / "kernels"
    source.mkdir()
    (source / "triton_kernel.py").write_text("# another kernel\n")
    monkeypatch.setattr(aot, "__file__", str(source / "aot.py"))
    assert aot.cache_key(JOB) != key


def test_failures_are_cached_as_failures(tmp_path):
    _stored(tmp_path, JOB, error="")
    path = tmp_path / f"{aot.cache_key(JOB)}.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"spill_stores": 4, "spill_loads": 4}))
    [result] = aot.run([JOB], workers=1, cache=str(tmp_path))
    assert result.cached and result.failures == ["spills 4/4 bytes"]
