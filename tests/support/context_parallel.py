"""Two CPU processes (gloo) running diffusers' context parallelism on the tiny FLUX.1 pipeline of
:mod:`support.models`, for tests/guided/test_context_parallel.py.

diffusers 0.42's ``enable_parallelism`` places each rank on ``torch.device(accelerator, rank %
torch.accelerator.device_count())``, a ``ZeroDivisionError`` on a machine without an accelerator. :func:`run_ranks`
runs every scenario of :data:`SCENARIOS` in each rank, in order: the first as shipped, the others with
``torch.accelerator.device_count`` made to answer 1 inside the worker processes only (the rank's device is then
``cpu``), which is enough for Ulysses attention (all-to-all over gloo) with the native backend; ring attention needs a
backend that returns the log-sum-exp (flash, sage: GPU only). One spawn for all: each process imports diffusers
once.

Each scenario returns a JSON-serialisable dict per rank; exceptions are caught and returned as
``{"error": type name, "message": str}`` so that the test reads what every rank saw.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error(err: BaseException) -> dict:
    return {"error": type(err).__name__, "message": str(err), "where": traceback.format_exc(limit=-3)}


def _ulysses():
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(ulysses_degree=WORLD)


def _pipe_and_inputs():
    from . import models as M

    return M.flux(), M.flux_inputs(batch=1, true_cfg_scale=1.0, steps=2)


def enable_as_shipped(rank: int) -> dict:
    """``enable_parallelism`` (Ulysses over both ranks) on the tiny Flux transformer, as diffusers ships it."""
    pipe, _ = _pipe_and_inputs()
    try:
        pipe.transformer.enable_parallelism(config=_ulysses())
    except Exception as err:  # noqa: BLE001 - the test reads what was raised
        return _error(err)
    return {"enabled": True}


def headpag_after_parallelism(rank: int) -> dict:
    """Context parallelism on, then ``headpag.enable_fused``; also the parallel output against the single-process
    one (both ranks hold the whole, gathered output), so that the refusal is shown on a setup that runs."""
    import headpag
    from . import models as M

    pipe, inputs = _pipe_and_inputs()
    single = M.run(pipe, inputs)
    pipe.transformer.enable_parallelism(config=_ulysses())
    parallel = M.run(pipe, inputs)
    out = {"parallel_vs_single": float((parallel - single).abs().max())}
    try:
        headpag.enable_fused(pipe, "0:0", scale=3.0)
    except Exception as err:  # noqa: BLE001
        out |= _error(err)
    out["hooks_left"] = bool(getattr(pipe.transformer, "_diffusers_hook", None)
                             and "headpag_guidance" in pipe.transformer._diffusers_hook.hooks)
    return out


def parallelism_after_headpag(rank: int) -> dict:
    """``headpag.enable_fused`` first, then context parallelism, then a guided pipeline call."""
    import headpag
    from . import models as M

    pipe, inputs = _pipe_and_inputs()
    headpag.enable_fused(pipe, "0:0", scale=3.0)
    pipe.transformer.enable_parallelism(config=_ulysses())
    try:
        M.run(pipe, inputs)
    except Exception as err:  # noqa: BLE001
        return _error(err)
    finally:
        headpag.disable(pipe)
    return {"ran": True}


#: Run in this order; every one after the first with the device-count shim.
SCENARIOS = {f.__name__: f for f in (enable_as_shipped, headpag_after_parallelism, parallelism_after_headpag)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    try:
        for i, (name, scenario) in enumerate(SCENARIOS.items()):
            if i == 1:
                torch.accelerator.device_count = lambda: 1
            try:
                results[name] = scenario(rank)
            except Exception as err:  # noqa: BLE001
                results[name] = _error(err)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def run_ranks(out_dir: Path) -> dict[str, list[dict]]:
    """Runs :data:`SCENARIOS` in :data:`WORLD` spawned processes (gloo): scenario name -> the result of each rank."""
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    ranks = [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    return {name: [r[name] for r in ranks] for name in SCENARIOS}
