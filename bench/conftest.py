"""Shared setup for the pytest-benchmark suites in bench/ (run them by path: ``python -m pytest bench/ --benchmark-only``).

Nothing here sets ``TRITON_INTERPRET``: the CUDA suites must time compiled kernels, and skip themselves when
the variable is set (e.g. when bench/ and tests/ share one pytest session, tests/conftest.py sets it).
"""

from __future__ import annotations

import os
import platform

import pytest
import torch


def _cpu_model() -> str:
    """The ``Model name`` line of /proc/cpuinfo (what ``lscpu | grep 'Model name'`` shows), else platform's."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_LOAD_AT_START: list[float] = []


def pytest_sessionstart(session):
    if hasattr(os, "getloadavg"):
        _LOAD_AT_START[:] = os.getloadavg()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Adds what the numbers depend on to the JSON's ``machine_info``, including the 1/5/15-minute load
    averages at the start and the end of the session: other work on the machine shows up there."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info["cpu_model"] = _cpu_model()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["torch"] = torch.__version__
    machine_info["torch_num_threads"] = torch.get_num_threads()
    machine_info["triton"] = triton_version
    machine_info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "")
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["cuda_runtime"] = torch.version.cuda
    machine_info["loadavg_at_start"] = list(_LOAD_AT_START)
    machine_info["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else []


@pytest.fixture(scope="session")
def baseline_medians() -> dict:
    """Median seconds per call of the baseline (SDPA, or a copy) of each benchmark group, filled in by the
    baseline tests, which are parametrized to run first in their group."""
    return {}
