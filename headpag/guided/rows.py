"""Batch rows of a denoiser call: binding its arguments, widening the per-row ones with the twins, narrowing them.

A guided call carries ``n_base`` rows (the pipeline's own ``[uncond, cond]``, ``[cond]`` or ``[cond, uncond]``)
plus one perturbed *twin* per cond row, appended after them. Which arguments are per row is named per class by
the architecture registry (never guessed from "leading dim == batch"): shared tensors such as Flux's ``txt_ids``
/ ``img_ids`` or a 0-d timestep stay as they are. Inside a named argument, containers (dicts, lists, tuples:
``added_cond_kwargs``, ControlNet residual lists, UNet skip tuples) are walked and every tensor whose leading
dim is the row count is treated as per row.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable

import torch

from ..archs import RowLayout


def map_rows(value: Any, n: int, fn: Callable[[torch.Tensor], torch.Tensor], frames: int = 1) -> Any:
    """Applies ``fn`` to every tensor in ``value`` (walking dicts, lists, tuples) whose leading dim is ``n``.

    With ``frames > 1`` (``Architecture.rows_per_sample``), a tensor whose leading dim is ``n * frames`` (each
    row's frames folded into consecutive rows) is mapped as ``(n, frames, ...)`` and folded back.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == n:
            return fn(value)
        if frames > 1 and value.dim() >= 1 and value.shape[0] == n * frames:
            return fn(value.unflatten(0, (n, frames))).flatten(0, 1)
        return value
    if isinstance(value, dict):
        return {k: map_rows(v, n, fn, frames) for k, v in value.items()}
    if isinstance(value, list):
        return [map_rows(v, n, fn, frames) for v in value]
    if isinstance(value, tuple):
        return tuple(map_rows(v, n, fn, frames) for v in value)
    return value


def group_size(value: Any, n: int) -> int:
    """``k`` for a tensor of ``k * n`` rows, ``k > 1`` (``Architecture.grouped_row_args``: ``k`` consecutive entries
    per row), else 1."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] > n and value.shape[0] % n == 0:
        return value.shape[0] // n
    return 1


def widen(value: Any, layout: RowLayout, frames: int = 1) -> Any:
    """Appends a copy of the cond rows (the twins) to every per-row tensor of ``n_base`` rows."""
    return map_rows(value, layout.n_base, lambda t: torch.cat([t, t[layout.cond.start:layout.cond.stop]]), frames)


def select_rows(value: Any, n: int, index: torch.Tensor | slice, frames: int = 1) -> Any:
    """Every per-row tensor of ``n`` rows, indexed by ``index`` (rows may repeat); a ``slice`` takes a view."""
    if isinstance(index, slice):
        return map_rows(value, n, lambda t: t[index], frames)
    return map_rows(value, n, lambda t: t.index_select(0, index.to(t.device)), frames)


def widen_list(value: list, layout: RowLayout) -> list:
    """A per-row list (one entry per base row) with the cond rows' entries appended (the twins)."""
    return [*value, *value[layout.cond.start:layout.cond.stop]]


def take_list(value: list, rows: range) -> list:
    """Keeps ``rows`` of a per-row list."""
    return list(value[rows.start:rows.stop])


def take_rows(value: Any, n: int, rows: range, frames: int = 1) -> Any:
    """Keeps ``rows`` of every per-row tensor of ``n`` rows."""
    return map_rows(value, n, lambda t: t[rows.start:rows.stop], frames)


# inspect.signature of bound methods, per underlying function (a bound method is a new object at every access).
_METHOD_SIGNATURES: "weakref.WeakKeyDictionary[Callable, inspect.Signature]" = weakref.WeakKeyDictionary()


def signature_of(forward) -> inspect.Signature:
    """``inspect.signature(forward)``, read once per function for bound methods (the denoiser's and the units'
    forwards, called every step); other callables (hook wrappers) are read each time."""
    func = getattr(forward, "__func__", None)
    if func is None or getattr(forward, "__self__", None) is None:
        return inspect.signature(forward)
    signature = _METHOD_SIGNATURES.get(func)
    if signature is None:
        signature = _METHOD_SIGNATURES[func] = inspect.signature(forward)
    return signature


def bind(forward, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """The arguments of a call ``forward(*args, **kwargs)`` by name (``bound.arguments``); defaults not applied.

    ``forward`` is a bound method or a hook wrapper around one: its signature has no ``self``.
    """
    return signature_of(forward).bind_partial(*args, **kwargs)


class Binder:
    """:func:`bind` for calls of one forward, its signature read once (again only when the forward object changes:
    diffusers rebuilds a hooked module's forward chain when hooks are added or removed)."""

    def __init__(self):
        self._forward = None
        self._signature: inspect.Signature | None = None

    def __call__(self, forward, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        if forward is not self._forward:
            self._signature, self._forward = signature_of(forward), forward
        return self._signature.bind_partial(*args, **kwargs)


def map_arguments(bound: inspect.BoundArguments, names: tuple[str, ...], fn: Callable[[Any], Any],
                  lists: tuple[str, ...] = (), list_fn: Callable[[list], list] | None = None,
                  grouped: tuple[str, ...] = (), group_fn: Callable[[Any], Any] | None = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the bound call with ``fn`` applied to the arguments called ``names`` (when given),
    ``list_fn`` instead to those of them named in ``lists`` (per-row lists) and ``group_fn`` to those in ``grouped``
    (several consecutive entries per row)."""
    arguments = dict(bound.arguments)
    for name in names:
        if arguments.get(name) is not None:
            mapper = list_fn if name in lists else group_fn if name in grouped else fn
            arguments[name] = mapper(arguments[name])
    mapped = inspect.BoundArguments(bound.signature, arguments)
    return mapped.args, mapped.kwargs


def _sample(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value.sample


def first_tensor(value: Any) -> torch.Tensor:
    """The sample tensor of a denoiser's output: ``(sample,)`` tuples and ``*Output`` dataclasses alike; a sample
    given as a list of per-row tensors (Z-Image) is stacked."""
    sample = _sample(value)
    return torch.stack(sample) if isinstance(sample, list) else sample


def replace_sample(value: Any, sample: torch.Tensor) -> Any:
    """``value`` (tuple or ``*Output``) with its sample replaced (as a list of per-row tensors where it was one).

    Every other per-row tensor of ``value`` (LTX-2's audio prediction) is narrowed to the replacement's rows, the first
    ones: a fused call's base rows (its twins come after them)."""
    old = _sample(value)
    n_old = len(old) if isinstance(old, list) else old.shape[0]
    n_new = sample.shape[0]

    def narrow(v: Any) -> Any:
        return v if n_new == n_old else map_rows(v, n_old, lambda t: t[:n_new])

    if isinstance(old, list):
        sample = list(sample.unbind(0))
    if isinstance(value, tuple):
        return (sample, *narrow(value[1:]))
    if isinstance(value, list):
        return [sample, *narrow(value[1:])]
    return type(value)(**{**{k: narrow(v) for k, v in value.items()}, "sample": sample})
