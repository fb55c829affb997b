"""The command line's host-memory setting (``headpag/apps/host_memory.py``): with it, glibc keeps a freed large
block in the process (no page faults for the next one); a user's own allocator setting is left alone."""

import os
import platform
import subprocess
import sys

import pytest

from headpag.apps import cli, host_memory

# Allocates a 16 MiB tensor, frees it, and prints what keep_freed_memory did and how much the resident set shrank.
PROBE = """
import os, sys, torch
from headpag.apps.host_memory import keep_freed_memory
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
state = keep_freed_memory() if sys.argv[1] == "set" else "not called"
block = torch.ones(4 << 20)  # 16 MiB (below the 32 MiB mmap threshold), every page touched
before = resident()
del block
print(state, (before - resident()) >> 20)
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting is glibc's")


def _probe(action: str, **env) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in host_memory.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", PROBE, action], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return " ".join(out[:-1]), int(out[-1])


@glibc_only
def test_freed_memory_stays_in_the_process_once_set():
    state, released = _probe("set")
    assert state == "set" and released < 4  # MiB: the block stays (a page or two may move)
    state, released = _probe("none")
    assert state == "not called" and released >= 15  # glibc's default gives the 16 MiB back at once


@glibc_only
def test_a_users_own_allocator_setting_is_left_alone():
    state, released = _probe("set", MALLOC_TRIM_THRESHOLD_="0")
    assert state == "user setting" and released >= 15
    assert _probe("set", GLIBC_TUNABLES="glibc.malloc.trim_threshold=0")[0] == "user setting"
    assert _probe("set", GLIBC_TUNABLES="glibc.pthread.rseq=0")[0] == "set"  # tunes something else


def test_a_refused_value_warns_and_the_command_runs_on(monkeypatch):
    class Refusing:
        def __init__(self, name):
            self.mallopt = lambda parameter, value: 0

    for name in host_memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(host_memory.platform, "system", lambda: "Linux")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.35"))
    monkeypatch.setattr(host_memory.ctypes, "CDLL", Refusing)
    with pytest.warns(RuntimeWarning, match="glibc refused mallopt"):
        assert host_memory.keep_freed_memory() == "failed"
    assert host_memory.state == "failed"


def test_every_command_sets_it_before_running(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("called"))
    assert cli.main(["demo", "--layers", "x"]) == 2  # refused before any model loads
    assert calls == ["called"]
    assert "--layers" in capsys.readouterr().err
