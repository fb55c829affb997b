"""What benchmark numbers depend on: the machine, the library versions and the headpag source measured."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from .. import host_memory


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo (what ``lscpu`` shows as Model name), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name() -> str | None:
    """``torch.cuda.get_device_name()`` of the current device, or ``None`` without CUDA."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (empty where the OS has none): other work on the machine shows here."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def headpag_source() -> dict:
    """Where the measured headpag comes from: its path and git commit (plus whether headpag/ or kernels/ have
    uncommitted changes), or ``HEADPAG_SOURCE_COMMIT`` for a copy outside git."""
    import headpag

    root = os.path.dirname(os.path.dirname(os.path.abspath(headpag.__file__)))
    out = dict(path=root)
    try:
        git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        out["commit"] = git("rev-parse", "--short", "HEAD")
        out["dirty"] = bool(git("status", "--porcelain", "--untracked-files=no", "--", "headpag", "kernels"))
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = os.environ.get("HEADPAG_SOURCE_COMMIT", "unknown")
    return out


def machine_info() -> dict:
    """CPU, thread count, GPU, versions and load average, for the JSON of every suite."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import diffusers

    return dict(
        cpu_model=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), gpu=gpu_name(),
        cuda_runtime=torch.version.cuda, torch=torch.__version__, triton=triton_version,
        diffusers=diffusers.__version__, python=platform.python_version(), platform=platform.platform(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""), load_average=load_average(),
        host_allocator=host_memory.state or "not set by headpag",
    )


# Image processors diffusers' IP-Adapter loader imports from transformers with every SD / SDXL / SD3 / Flux pipeline.
IP_ADAPTER_IMAGE_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")


def use_pil_image_processors() -> list[str]:
    """Without torchvision, transformers resolves ``CLIPImageProcessor`` and ``SiglipImageProcessor`` to their
    ``...Pil`` classes the first time they are imported and logs a notice saying so ("import ``...Pil`` directly to
    silence this warning"). The suites never process an image; bind those names to the ``...Pil`` classes first,
    as the notice advises, so the report's output carries no notice. Does nothing with torchvision installed.
    Returns the names bound."""
    import importlib.util
    import sys

    if importlib.util.find_spec("torchvision") is not None:
        return []
    import transformers

    pil = {name: getattr(transformers, f"{name}Pil", None) for name in IP_ADAPTER_IMAGE_PROCESSORS}
    module = sys.modules["transformers"]  # resolving a lazy name may put a new module object there: bind on that one
    bound = []
    for name, cls in pil.items():
        if cls is not None and name not in vars(module):
            setattr(module, name, cls)
            bound.append(name)
    return bound
