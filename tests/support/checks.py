"""Lifecycle helpers of the guided tests: guided runs that always disable, the fused == eager == restored check,
restoration snapshots and per-call row recording. Tolerances are in tolerances.py."""

from __future__ import annotations

import contextlib
import inspect

import torch

import headpag

from . import models as M
from .tolerances import MIN_EFFECT, close

ENABLE = {"fused": headpag.enable_fused, "eager": headpag.enable_eager}


def with_plain(model: str, build: dict | None = None, **inputs) -> tuple:
    """``(pipe, inputs, plain)``: :func:`support.models.make`, and the unpatched pipeline's output for them."""
    pipe, call = M.make(model, build, **inputs)
    return pipe, call, M.run(pipe, call)


def effect(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@contextlib.contextmanager
def patched(pipe, execution: str, heads, **settings):
    """``pipe`` with headpag enabled (``execution``: "fused" or "eager") inside the block; always disabled after."""
    ENABLE[execution](pipe, heads, **settings)
    try:
        yield pipe
    finally:
        headpag.disable(pipe)


def guided(pipe, execution: str, heads, inputs: dict, **settings) -> torch.Tensor:
    """The output of ``pipe(**inputs)`` with headpag enabled for this one run."""
    with patched(pipe, execution, heads, **settings):
        return M.run(pipe, inputs)


def check_fused_eager_restore(pipe, inputs: dict, heads, **settings) -> None:
    """Fused == eager (``TOL["families"]``), guidance changes the output, disable restores the plain pipeline
    bit for bit, and ``scale=0`` is the plain pipeline."""
    plain = M.run(pipe, inputs)
    fused, eager = (guided(pipe, execution, heads, inputs, **settings) for execution in ("fused", "eager"))
    close(fused, eager, "families")
    assert effect(fused, plain) > MIN_EFFECT, "guidance changed nothing"
    assert torch.equal(M.run(pipe, inputs), plain), "disable did not restore the pipeline"
    assert torch.equal(guided(pipe, "fused", heads, inputs, **{**settings, "scale": 0.0}), plain), \
        "scale=0 is not the plain pipeline"


def attention_modules(den: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module with a ``processor`` (works for DiT, which has no ``attn_processors``)."""
    return {name: m for name, m in den.named_modules() if hasattr(m, "processor")}


def snapshot(pipe) -> dict:
    """What enable/disable must leave as it found: processor identities, hook registries, forward methods."""
    den = M.denoiser(pipe)
    snap = {
        "processors": {name: id(m.processor) for name, m in attention_modules(den).items()},
        "registries": {name: (tuple(m._diffusers_hook.hooks) if hasattr(m, "_diffusers_hook") else None)
                       for name, m in den.named_modules()},
        # a hook wrapper replaces the instance's forward; restored means calling .forward calls the class's forward
        "forwards": {name: bool(inspect.ismethod(m.forward) and m.forward.__func__ is type(m).forward
                                and m.forward.__self__ is m) for name, m in den.named_modules()},
    }
    if hasattr(den, "attn_processors"):
        snap["attn_processors"] = {k: id(v) for k, v in den.attn_processors.items()}
    return snap


def layer_index(pipe, prefix: str) -> int:
    """Index of the first layer whose module name starts with ``prefix``."""
    return next(layer.index for layer in headpag.list_layers(pipe) if layer.name.startswith(prefix))


def n_layers(pipe) -> int:
    return len(headpag.list_layers(pipe))


@contextlib.contextmanager
def recorded_rows(modules: dict[str, torch.nn.Module]):
    """Inside the block, forward pre-hooks record the leading dim of the first tensor argument of each module, per
    call: yields ``{name: [rows of call 1, rows of call 2, ...]}``. The hooks are removed on exit."""
    log: dict[str, list[int]] = {name: [] for name in modules}

    def make(name):
        def hook(module, args, kwargs):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            log[name].append(x.shape[0])

        return hook

    handles = [m.register_forward_pre_hook(make(name), with_kwargs=True) for name, m in modules.items()]
    try:
        yield log
    finally:
        for h in handles:
            h.remove()
