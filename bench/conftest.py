"""Shared setup of the pytest-benchmark suites in bench/ (``python -m pytest bench/ --benchmark-only``).

The suites' cases, checks and step functions live in ``headpag.apps.benchmarks`` (what ``headpag bench`` runs); the
files here only time them with pytest-benchmark. Nothing here sets ``TRITON_INTERPRET``: the CUDA suites must time
compiled kernels and skip themselves when it is set (tests/conftest.py sets it: do not share a session with tests/).
"""

from __future__ import annotations

import pytest

from headpag.apps.benchmarks import machine
from headpag.apps.host_memory import keep_freed_memory

_LOAD_AT_START: list[float] = []


def pytest_sessionstart(session):
    keep_freed_memory()  # as `headpag bench` does (headpag/apps/host_memory.py)
    _LOAD_AT_START[:] = machine.load_average()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Adds what the numbers depend on (CPU, threads, GPU, versions) and the load averages at the start and the end
    of the session: other work on the machine shows up there."""
    machine_info.update(machine.machine_info(), loadavg_at_start=list(_LOAD_AT_START), loadavg_at_end=machine.load_average())


@pytest.fixture(scope="session")
def baseline_medians() -> dict:
    """Median seconds per call of each group's baseline, filled in by the baseline benchmarks, which are
    parametrized to run first in their group."""
    return {}
