"""diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(...))``) with headpag:
refused, whichever is enabled first, with a message saying what to do.

Why refused rather than supported: diffusers 0.42's context parallelism does not run on CPU as shipped (its
``enable_parallelism`` divides by ``torch.accelerator.device_count()``, 0 without an accelerator), so head-level
PAG under it cannot be tested against the single-process output here. With that count made to answer 1 inside the
worker processes (support/context_parallel.py), Ulysses attention does run over two gloo processes and equals the
single-process output; these tests use that to show the refusal on a setup that really runs.
"""

from __future__ import annotations

import pytest
from diffusers import ContextParallelConfig, ParallelConfig

import headpag
from support import models as M
from support.checks import patched
from support.context_parallel import run_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_refused_on_a_processor_set_up_for_context_parallelism():
    """What ``enable_parallelism`` records on every attention processor (``_parallel_config``) makes enabling raise,
    naming the layer and what to do, and leaves no hook behind; unselected layers do not matter."""
    pipe = M.flux()
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    pipe.transformer.transformer_blocks[0].attn.processor._parallel_config = config
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn.*context parallelism.*enable_parallelism"):
        headpag.enable_fused(pipe, "0:0", scale=3.0)
    assert not getattr(pipe.transformer, "_diffusers_hook", None) or not pipe.transformer._diffusers_hook.hooks
    pipe.transformer.transformer_blocks[0].attn.processor._parallel_config = None
    with patched(pipe, "fused", "0:0", scale=3.0):  # the same layer without it: accepted and guided
        M.run(pipe, M.flux_inputs(batch=1, true_cfg_scale=1.0, steps=1))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """Every scenario of support/context_parallel.py in two gloo processes (one spawn)."""
    return run_ranks(tmp_path_factory.mktemp("context_parallel"))


def test_diffusers_context_parallelism_needs_an_accelerator(ranks):
    """The finding behind the refusal: ``enable_parallelism`` with two gloo CPU processes raises from diffusers 0.42
    on (it places rank r on ``r % torch.accelerator.device_count()``); 0.41 enables it (the stack matrix's oldest
    stack). If 0.42+ starts to enable it, diffusers' context parallelism may run on CPU: revisit the refusal (README,
    "Caches, IP-Adapter, context parallelism")."""
    import diffusers
    from packaging.version import Version

    results = ranks["enable_as_shipped"]
    if Version(diffusers.__version__) >= Version("0.42"):
        assert [r.get("error") for r in results] == ["ZeroDivisionError"] * 2, results
    else:
        assert [r.get("enabled") for r in results] == [True] * 2, results


def test_refused_after_enable_parallelism(ranks):
    """Two processes, Ulysses over both: the parallel output equals the single-process one (the setup runs), then
    ``enable_fused`` raises the context-parallel refusal and attaches nothing."""
    results = ranks["headpag_after_parallelism"]
    for rank, r in enumerate(results):
        assert r["parallel_vs_single"] < 1e-5, (rank, r)
        assert r.get("error") == "ValueError" and "context parallelism" in r["message"], (rank, r)
        assert not r["hooks_left"], (rank, r)


def test_refused_at_the_guided_call_when_parallelism_comes_later(ranks):
    """headpag first, context parallelism after: the first guided call raises at the selected layer's attention
    (its call carries ``_parallel_config``) instead of guiding a head shard with the wrong coefficients."""
    results = ranks["parallelism_after_headpag"]
    for rank, r in enumerate(results):
        assert r.get("error") == "ValueError" and "context-parallel attention" in r["message"], (rank, r)
