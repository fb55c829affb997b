"""Lifecycle helpers of the guided tests: guided runs that always disable, the fused == eager == restored check,
the check against diffusers' own PAG pipelines, restoration snapshots, layer tables and per-call row recording.
Tolerances are in tolerances.py; the check against a reference fold is in reference.py."""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable

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


def guided(pipe, execution: str, heads, inputs: dict, *, run=M.run, **settings) -> torch.Tensor:
    """The output of ``run(pipe, inputs)`` (``support.models.run``: ``pipe(**inputs)``'s latents) with headpag
    enabled for this one run."""
    with patched(pipe, execution, heads, **settings):
        return run(pipe, inputs)


def check_fused_eager_restore(pipe, inputs: dict, heads, *, run=M.run, **settings) -> None:
    """Fused == eager (``TOL["families"]``), guidance changes the output, disable restores the plain pipeline
    bit for bit, and ``scale=0`` is the plain pipeline; the outputs are ``run(pipe, inputs)``'s (:func:`guided`)."""
    plain = run(pipe, inputs)
    fused, eager = (guided(pipe, execution, heads, inputs, run=run, **settings) for execution in ("fused", "eager"))
    close(fused, eager, "families")
    assert effect(fused, plain) > MIN_EFFECT, "guidance changed nothing"
    assert torch.equal(run(pipe, inputs), plain), "disable did not restore the pipeline"
    assert torch.equal(guided(pipe, "fused", heads, inputs, run=run, **{**settings, "scale": 0.0}), plain), \
        "scale=0 is not the plain pipeline"


def check_matches_peer(pipe, inputs: dict, peer, heads, *, rows: tuple, run=M.run, mode: str = "joint",
                       **peer_kwargs) -> None:
    """diffusers' PAG pipeline class ``peer`` on ``pipe``'s components (:func:`support.models.peer`, with
    ``peer_kwargs``: ``pag_applied_layers``, ...) at ``pag_scale=3``: its output's leading dims are ``rows`` and
    differ from the plain output by more than ``MIN_EFFECT``, and ``heads`` guided at scale 3 with ``u = 1`` in
    ``mode`` equal it, fused and eager (``TOL["peer"]``). Outputs are ``run(pipe, inputs)``'s."""
    plain = run(pipe, inputs)
    expected = run(M.peer(pipe, peer, **peer_kwargs), {**inputs, "pag_scale": 3.0})
    assert expected.shape[:len(rows)] == rows and effect(expected, plain) > MIN_EFFECT
    for execution in ENABLE:
        out = guided(pipe, execution, heads, inputs, run=run, scale=3.0, u=1, mode=mode)
        close(out, expected, "peer", f"{execution}, guidance_scale={inputs['guidance_scale']}")


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


def layer_table(model) -> list[tuple]:
    """``(index, name, heads, head_dim, kind, fork_unit)`` of each layer of ``model`` (a pipeline or a denoiser)."""
    return [(x.index, x.name, x.heads, x.head_dim, x.kind, x.fork_unit) for x in headpag.list_layers(model)]


def forward_order(modules: dict, call: Callable[[], object]) -> list:
    """The keys of ``modules`` in the order their forwards start during ``call()`` (run under ``no_grad``; the
    hooks are removed after)."""
    order = []
    handles = [m.register_forward_pre_hook(lambda mod, args, key=key: order.append(key)) for key, m in modules.items()]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return order


def check_layer_table(pipe, expected: list, heads: list, head_dims: list, kind: str, units: list,
                      run: Callable[[], object]) -> None:
    """``list_layers`` and ``forward_units`` of ``pipe`` as expected (``expected``: ``(name, fork unit)`` per layer),
    and ``run()`` (a pipeline call) starts the self- / joint-attention modules, found by name independently of
    ``list_layers``, in exactly that order, once per denoiser call."""
    layers = headpag.list_layers(pipe)
    assert [x.index for x in layers] == list(range(len(expected)))
    assert [(x.name, x.fork_unit) for x in layers] == expected
    assert [x.heads for x in layers] == heads and [x.head_dim for x in layers] == head_dims
    assert {x.kind for x in layers} == {kind}
    assert headpag.forward_units(pipe) == units
    attention = {n: m for n, m in M.denoiser(pipe).named_modules() if n.endswith((".attn", ".attn1"))}
    calls = forward_order(attention, run)
    n_calls = len(calls) // len(layers)
    assert n_calls >= 1 and calls == [x.name for x in layers] * n_calls


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


def guided_rows(pipe, modules: dict[str, torch.nn.Module], execution: str, heads, inputs: dict, *, run=M.run,
                **settings) -> tuple[dict[str, list[int]], torch.Tensor]:
    """:func:`recorded_rows` of ``modules`` around a :func:`guided` run (the recording hooks registered first):
    ``(rows per call of each module, the output)``."""
    with recorded_rows(modules) as log:
        out = guided(pipe, execution, heads, inputs, run=run, **settings)
    return log, out


def fork_rows(pipe, inputs: dict, heads, blocks, *, cfg: bool, n_cond: int = 2,
              **modules: torch.nn.Module) -> tuple[dict[str, list[int]], list[int], list[int]]:
    """Rows per call, with ``heads`` fused at scale 3 (the recording hooks registered after headpag's), of each
    block's ``norm1`` (``"block{i}"``: inner modules see the rows the block runs), of ``modules`` and of the
    denoiser's ``norm_out``; with the rows per call expected before the fork (the base rows: ``[uncond, cond]``
    with ``cfg``, ``n_cond`` cond rows without) and from the fork on (the base rows and one twin per cond row)."""
    modules = {f"block{i}": b.norm1 for i, b in enumerate(blocks)} | modules
    modules["norm_out"] = M.denoiser(pipe).norm_out
    with patched(pipe, "fused", heads, scale=3.0), recorded_rows(modules) as log:
        M.run(pipe, inputs)
    steps = inputs["num_inference_steps"]
    n_base = 2 * n_cond if cfg else n_cond
    return log, [n_base] * steps, [n_base + n_cond] * steps
