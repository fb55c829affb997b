"""enable_fused / enable_eager / disable / configure / fused: head-level PAG on a standard diffusers pipeline.

Everything is attached with diffusers' hook registry, so the denoiser keeps its identity, every processor stays
the same object, and ``disable`` removes exactly what was added:

- a hook on the denoiser decides per call whether this step is guided (PAG interval, ``scale > 0``), finds the
  pipeline's row layout, runs the guided forward and folds ``delta = w * (cond - perturbed)`` into the uncond
  and cond rows (``guidance.py``);
- fused: the per-row denoiser inputs are widened at entry with a twin of every cond row; every forward-loop unit
  before the first *fork unit* that holds a selected head runs on the base rows only (its per-row inputs
  narrowed, its outputs widened by copying the cond rows), so the twins cost nothing until the fork;
- eager: a separate forward on the cond rows with the perturbed maps materialised (the paper's way), kept as
  oracle and benchmark baseline;
- a hook on each selected attention module routes its attention to the kernel (``processors.py``).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .guidance import check_interval, check_scale, fold, guided_channels, in_interval, perturbation_delta, step_position
from .heads import HeadSet
from .kernels import perturbed_attention_from_plan, reference_attention
from .kernels.validation import IDENTITY, PLAIN, SOFT
from .layers import LayerInfo, forward_units, get_denoiser, list_layers, model_class_name
from .processors import PerturbedSDPA, RowCoefficients, check_default_processor
from .rows import (
    DENOISER_ROW_ARGS, UNIT_ROW_ARGS, RowLayout, first_tensor, get_argument, map_arguments, replace_sample, select_rows,
    take_rows, widen,
)

MODES = ("joint", "image")
_DENOISER_HOOK = "headpag_guidance"
_UNIT_HOOK = "headpag_rows"
_ATTENTION_HOOK = "headpag_attention"

# Pipelines whose denoiser call order headpag knows: how uncond and cond rows are laid out in one call.
#   "uncond_cond": one call per step, rows [uncond, cond] with CFG (pipe.do_classifier_free_guidance), else [cond]
#   "uncond_cond_local": the same, CFG read from the pipeline's local ``do_classifier_free_guidance`` (PixArt keeps
#       no attribute for it)
#   "cond_uncond": DiT, rows [cond, uncond] with CFG (second half all null class labels), else [cond]
#   "separate": Flux, the cond rows in one call under cache_context("cond"), with true CFG the uncond rows in a
#       second call under cache_context("uncond"); delta from the cond call is added in the uncond call
PIPELINE_ROW_LAYOUTS = {
    "StableDiffusionPipeline": "uncond_cond",
    "StableDiffusionXLPipeline": "uncond_cond",
    "StableDiffusion3Pipeline": "uncond_cond",
    "StableDiffusionControlNetPipeline": "uncond_cond",
    "StableDiffusionXLControlNetPipeline": "uncond_cond",
    "PixArtSigmaPipeline": "uncond_cond_local",
    "PixArtAlphaPipeline": "uncond_cond_local",
    "DiTPipeline": "cond_uncond",
    "FluxPipeline": "separate",
    "DigitsPipeline": "uncond_cond",  # headpag.digits, the embedded default model
}


@dataclass(frozen=True)
class Settings:
    """What a patched pipeline does: heads (resolved, per-head u), PAG scale, mode and interval."""

    heads: HeadSet
    scale: float
    mode: str
    interval: tuple[float, float]


def _settings(denoiser, heads, scale, u, mode, interval) -> Settings:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    heads = HeadSet.from_any(heads).resolve(denoiser)
    if u is not None:
        heads = heads.with_u(u)
    if not len(heads):
        raise ValueError("heads is empty: select at least one (layer, head), e.g. '4:0' or [(4, 0)]")
    return Settings(heads, check_scale(scale), mode, check_interval(interval))


def _row_layout(pipe, kind: str, denoiser, forward, args, kwargs) -> RowLayout | None:
    """The layout of this call, or None for a call that is neither a plain uncond/cond call (SD3's skip-layer
    guidance pass)."""
    if get_argument(forward, "skip_layers", args, kwargs) is not None:
        return None
    sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    n = sample.shape[0]
    if kind == "separate":
        return RowLayout(n, range(0, n), None)
    if kind in ("uncond_cond", "uncond_cond_local"):
        if getattr(pipe, "guidance_rescale", 0.0):
            raise ValueError(
                "guidance_rescale > 0 is not supported with headpag: it rescales against the cond prediction, which "
                "the fold has moved; call the pipeline with guidance_rescale=0"
            )
        cfg = pipe.do_classifier_free_guidance if kind == "uncond_cond" else _caller_local(pipe, "do_classifier_free_guidance")
        if cfg:
            return RowLayout(n, range(n // 2, n), range(0, n // 2))
        return RowLayout(n, range(0, n), None)
    labels = get_argument(forward, "class_labels", args, kwargs)
    null = denoiser.config.num_embeds_ada_norm
    if n % 2 == 0 and labels is not None and bool((labels[n // 2:] == null).all()):
        return RowLayout(n, range(0, n // 2), range(n // 2, n))
    return RowLayout(n, range(0, n), None)


def _caller_local(pipe, name: str):
    """The local variable ``name`` of the innermost running method of ``pipe`` (its ``__call__``)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is pipe and name in frame.f_locals:
            return frame.f_locals[name]
        frame = frame.f_back
    raise RuntimeError(f"{type(pipe).__name__}'s denoiser was called outside the pipeline's __call__: cannot tell its rows")


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _Call:
    """State of one guided denoiser call, read by the unit and attention hooks.

    Perturbed row ``j`` (``perturbed_rows[j]``) uses the head set ``patch.heads_of(j)``: the same set for every row
    in a plain guided call, one set per row when HeadHunter evaluates many candidates in one batch.
    """

    def __init__(self, patch: "_Patch", layout: RowLayout, perturbed_rows: range, n_rows: int, n_text: int, device):
        self.layout = layout
        self.n_rows = n_rows
        self.device = device
        head_sets = [patch.heads_of(j) for j in range(len(perturbed_rows))]
        text_first = patch.model_class == "FluxTransformer2DModel"
        self.coefficients: dict[str, RowCoefficients] = {}
        for layer in patch.selected_layers:
            u = torch.zeros(n_rows, layer.heads, dtype=torch.float32)
            for j, heads in enumerate(head_sets):
                for h, coef in heads.u_for(layer.index).items() if layer.index in heads.layers() else ():
                    u[perturbed_rows[j], h] = coef
            plan = [[PLAIN if x == 0 else IDENTITY if x == 1 else SOFT for x in row] for row in u.tolist()]
            self.coefficients[layer.name] = RowCoefficients(
                u.to(device), plan, patch.settings.mode, n_text if layer.kind == "joint" else 0, text_first
            )
        # Unit position from which each twin carries its own rows (fused calls).
        self.fork_positions = [patch.fork_position_of(heads) for heads in head_sets]
        # Eager perturbed passes run every unit on all their rows.
        self._unit_rows = {position: self._rows_at(position) if patch.fused else None for position in range(len(patch.units))}
        self.running: int | None = None  # position of a unit running on a subset of the rows
        self._subsets = {
            (name, position): self._subset(full, self._run_rows(position))
            for position, rows in self._unit_rows.items() if rows is not None
            for name, full in self.coefficients.items()
        }

    @staticmethod
    def _subset(full: RowCoefficients, rows: list[int]) -> RowCoefficients:
        index = torch.tensor(rows, device=full.u.device)
        return RowCoefficients(full.u.index_select(0, index), [full.plan[r] for r in rows], full.mode, full.n_text,
                               full.text_first)

    def coefficients_for(self, layer: str) -> RowCoefficients:
        """The layer's coefficients for the rows running now (a subset inside a unit some twins skip)."""
        if self.running is None:
            return self.coefficients[layer]
        return self._subsets[(layer, self.running)]

    def unit_rows(self, position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For the unit at ``position`` of a fused call: ``(rows to run, gather)``, or None when every row runs."""
        return self._unit_rows[position]

    def _run_rows(self, position: int) -> list[int]:
        """Rows that run the unit at ``position``: the base rows and the twins forked by then."""
        n_base = self.layout.n_base
        return list(range(n_base)) + [n_base + j for j, fork in enumerate(self.fork_positions) if fork <= position]

    def _rows_at(self, position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        # ``gather`` maps every row of the full batch to a row of the unit's output: a twin that has not forked yet
        # copies its cond row.
        forked = [j for j, fork in enumerate(self.fork_positions) if fork <= position]
        if len(forked) == len(self.fork_positions):
            return None
        n_base, cond = self.layout.n_base, self.layout.cond
        run = self._run_rows(position)
        slot = {j: n_base + i for i, j in enumerate(forked)}
        gather = list(range(n_base)) + [slot.get(j, cond.start + j) for j in range(len(self.fork_positions))]
        return torch.tensor(run, device=self.device), torch.tensor(gather, device=self.device)


class _DenoiserHook(ModelHook):
    # Stateful so that diffusers' cache_context (Flux: "cond" / "uncond") reaches it.
    _is_stateful = True

    def __init__(self, patch: "_Patch"):
        super().__init__()
        self.patch = patch
        self.context = StateManager(_NoState)

    def new_forward(self, module, *args, **kwargs):
        context = self.context._context
        return self.patch.denoise(self.fn_ref.original_forward, args, kwargs, context.name if context else None)

    def reset_state(self, module):
        return module


class _UnitHook(ModelHook):
    """Runs a forward-loop unit on the base rows and the twins that have forked by now; a twin that has not forked
    yet gets a copy of its cond row's output."""

    def __init__(self, patch: "_Patch", position: int, names: tuple[str, ...]):
        super().__init__()
        self.patch = patch
        self.position = position
        self.names = names

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        call = self.patch.call
        rows = call.unit_rows(self.position) if call is not None and self.patch.fused else None
        if rows is None:
            return forward(*args, **kwargs)
        run, gather = rows
        args, kwargs = map_arguments(forward, self.names, args, kwargs, lambda v: select_rows(v, call.n_rows, run))
        call.running = self.position
        try:
            out = forward(*args, **kwargs)
        finally:
            call.running = None
        return select_rows(out, len(run), gather)


class _AttentionHook(ModelHook):
    def __init__(self, patch: "_Patch", name: str):
        super().__init__()
        self.patch = patch
        self.name = name

    def new_forward(self, module, *args, **kwargs):
        call = self.patch.call
        forward = self.fn_ref.original_forward
        if call is None:
            return forward(*args, **kwargs)
        attention = perturbed_attention_from_plan if self.patch.fused else reference_attention
        with PerturbedSDPA(attention, call.coefficients_for(self.name), self.name):
            return forward(*args, **kwargs)


class _Patch:
    """Everything enable_* attached to one pipeline, so that disable can take it away again."""

    def __init__(self, pipe, denoiser, execution: str, settings: Settings):
        self.pipe_ref = weakref.ref(pipe)
        self.denoiser = denoiser
        self.model_class = model_class_name(denoiser)
        self.fused = execution == "fused"
        self.layers: list[LayerInfo] = list_layers(denoiser)
        self.units = forward_units(denoiser)
        self.unit_position = {unit: i for i, unit in enumerate(self.units)}
        self.row_heads: list[HeadSet] | None = None
        self.channels = guided_channels(denoiser)
        self.row_kind = PIPELINE_ROW_LAYOUTS[type(pipe).__name__]
        self.call: _Call | None = None
        self._step_delta: tuple[int, torch.Tensor] | None = None
        self._step = -1
        self._hooked: list[tuple[torch.nn.Module, str]] = []
        self._new_registries: list[torch.nn.Module] = []
        self.settings = settings
        self._select(settings)
        self._hook(denoiser, _DenoiserHook(self), _DENOISER_HOOK)
        for position, unit in enumerate(self.units):
            module = denoiser.get_submodule(unit)
            names = UNIT_ROW_ARGS.get(type(module).__name__)
            if names is None:
                raise TypeError(f"unit {unit} of {self.model_class} is a {type(module).__name__}, whose per-row arguments headpag does not know")
            self._hook(module, _UnitHook(self, position, names), _UNIT_HOOK)

    # --- settings -------------------------------------------------------------------------------------------
    def heads_of(self, j: int) -> HeadSet:
        """Head set of perturbed row ``j``."""
        return self.row_heads[j % len(self.row_heads)] if self.row_heads else self.settings.heads

    def fork_position_of(self, heads: HeadSet) -> int:
        """Position in the forward loop of the first unit holding a head of ``heads``."""
        return min(self.unit_position[self.layers[i].fork_unit] for i in heads.layers())

    def set_row_heads(self, row_heads: list[HeadSet] | None) -> None:
        """One head set per perturbed row, cycling (HeadHunter's batched candidates); None: the settings' set."""
        resolved = [HeadSet.from_any(h).resolve(self.denoiser) for h in row_heads] if row_heads else None
        if resolved is not None and not all(len(h) for h in resolved):
            raise ValueError("every row's head set must hold at least one head")
        self._select(self.settings, resolved)

    def _select(self, settings: Settings, row_heads: list[HeadSet] | None = None) -> None:
        """Checks and hooks the selected layers; unhooks layers no longer selected."""
        indices = set(settings.heads.layers()).union(*(h.layers() for h in row_heads or ()))
        selected = [self.layers[i] for i in sorted(indices)]
        for layer in selected:
            check_default_processor(layer.name, self.denoiser.get_submodule(layer.name))
        for module, name in list(self._hooked):
            if name == _ATTENTION_HOOK and module not in [self.denoiser.get_submodule(l.name) for l in selected]:
                self._unhook(module, name)
        hooked = {id(m) for m, n in self._hooked if n == _ATTENTION_HOOK}
        for layer in selected:
            module = self.denoiser.get_submodule(layer.name)
            if id(module) not in hooked:
                self._hook(module, _AttentionHook(self, layer.name), _ATTENTION_HOOK)
        self.selected_layers = selected
        self.settings = settings
        self.row_heads = row_heads
        self._calls: dict[tuple, _Call] = {}

    # --- hooks ----------------------------------------------------------------------------------------------
    def _hook(self, module, hook, name) -> None:
        if getattr(module, "_diffusers_hook", None) is None:
            self._new_registries.append(module)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._hooked.append((module, name))

    def _unhook(self, module, name) -> None:
        module._diffusers_hook.remove_hook(name, recurse=False)
        self._hooked.remove((module, name))

    def remove(self) -> None:
        for module, name in reversed(list(self._hooked)):
            self._unhook(module, name)
        for module in self._new_registries:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and not registry.hooks:
                del module._diffusers_hook
        self.denoiser._diffusers_hook.invalidate_child_registries_cache() if hasattr(self.denoiser, "_diffusers_hook") else None

    # --- the guided call -----------------------------------------------------------------------------------
    def _call_state(self, layout: RowLayout, perturbed_rows: range, n_rows: int, n_text: int, device) -> _Call:
        """The call state of a batch layout, built once and reused every step (``torch.compile`` guards on it)."""
        key = (layout, perturbed_rows, n_rows, n_text, str(device))
        if key not in self._calls:
            self._calls[key] = _Call(self, layout, perturbed_rows, n_rows, n_text, device)
        return self._calls[key]

    # Under torch.compile the hook runs eagerly (reading the step and the rows needs host values); the model's own
    # forward, which it calls, is compiled as a frame of its own: once per batch layout (fork / no fork).
    @torch.compiler.disable(recursive=False)
    def denoise(self, forward, args: tuple, kwargs: dict, context: str | None) -> Any:
        plan = self._plan(forward, args, kwargs, context)
        if plan is None:
            return forward(*args, **kwargs)
        kind, layout, call, call_args, call_kwargs = plan
        if kind == "shift":
            return self._shift(forward(*args, **kwargs))
        if kind == "fused":
            return self._fold(self._perturbed_forward(call, forward, call_args, call_kwargs), layout, None)
        out = forward(*args, **kwargs)
        return self._fold(out, layout, self._perturbed_forward(call, forward, call_args, call_kwargs))

    def _perturbed_forward(self, call: "_Call", forward, args: tuple, kwargs: dict):
        """``forward(*args, **kwargs)`` with ``call`` visible to the unit and attention hooks."""
        self.call = call
        try:
            return forward(*args, **kwargs)
        finally:
            self.call = None

    @torch.compiler.disable
    def _plan(self, forward, args: tuple, kwargs: dict, context: str | None):
        """What this call does: None (not guided), or ``(kind, layout, call state, arguments of the (second)
        forward)`` with kind "shift" (SD3's skip-layer-guidance pass, Flux's true-CFG uncond call: shifted by this
        step's delta), "fused" or "eager"."""
        pipe = self.pipe_ref()
        settings = self.settings
        timestep = get_argument(forward, "timestep", args, kwargs)
        if self.model_class == "FluxTransformer2DModel":
            timestep = timestep * 1000  # FluxPipeline passes t / 1000
        timesteps = pipe.scheduler.timesteps
        if isinstance(timestep, torch.Tensor) and timestep.device.type == "meta":
            # Costing on the meta device: the step cannot be read, so every call of a non-empty interval is guided.
            step = -1
            guided = settings.scale > 0 and settings.interval[0] < settings.interval[1]
        else:
            step = step_position(timesteps, timestep)
            guided = settings.scale > 0 and in_interval(step, len(timesteps), settings.interval)
        if not guided:
            return None
        self._step = step
        layout = _row_layout(pipe, self.row_kind, self.denoiser, forward, args, kwargs)
        if layout is None or context == "uncond":
            return "shift", layout, None, args, kwargs
        ehs = get_argument(forward, "encoder_hidden_states", args, kwargs)
        n_text = ehs.shape[1] if isinstance(ehs, torch.Tensor) and ehs.dim() == 3 else 0
        names = DENOISER_ROW_ARGS[self.model_class]
        device = (args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))).device
        if self.fused:
            call = self._call_state(layout, layout.twins, layout.n_rows, n_text, device)
            return ("fused", layout, call) + map_arguments(forward, names, args, kwargs, lambda v: widen(v, layout))
        call = self._call_state(layout, range(len(layout.cond)), len(layout.cond), n_text, device)
        cond = map_arguments(forward, names, args, kwargs, lambda v: take_rows(v, layout.n_base, layout.cond))
        return ("eager", layout, call) + cond

    @torch.compiler.disable
    def _shift(self, out):
        if self._step_delta is None or self._step_delta[0] != self._step:
            return out
        sample = first_tensor(out)
        return replace_sample(out, (sample.float() + self._step_delta[1]).to(sample.dtype))

    @torch.compiler.disable
    def _fold(self, out, layout: RowLayout, perturbed_out):
        """Folds ``delta`` into the base rows of ``out``; the perturbed rows are ``out``'s twins (fused) or the
        output of the separate perturbed pass (eager)."""
        sample = first_tensor(out)
        base = sample[: layout.n_base]
        perturbed = sample[layout.n_base:] if perturbed_out is None else first_tensor(perturbed_out)
        delta = perturbation_delta(base[layout.cond.start:layout.cond.stop], perturbed, self.settings.scale, self.channels)
        self._step_delta = (self._step, delta)
        return replace_sample(out, fold(base, layout, delta))


def _patch_of(pipe) -> _Patch | None:
    denoiser = get_denoiser(pipe)
    return _PATCHES.get(denoiser)


_PATCHES: "weakref.WeakKeyDictionary[torch.nn.Module, _Patch]" = weakref.WeakKeyDictionary()


def _enable(pipe, heads, scale, u, mode, interval, execution) -> None:
    name = type(pipe).__name__
    if name not in PIPELINE_ROW_LAYOUTS:
        raise TypeError(f"unsupported pipeline {name}: headpag supports {', '.join(PIPELINE_ROW_LAYOUTS)}")
    denoiser = get_denoiser(pipe)
    settings = _settings(denoiser, heads, scale, u, mode, interval)
    if denoiser in _PATCHES:
        disable(pipe)
    _PATCHES[denoiser] = _Patch(pipe, denoiser, execution, settings)


def enable_fused(pipe, heads, *, scale: float = 3.0, u: float | None = None, mode: str = "joint",
                 interval: tuple[float, float] = (0.0, 1.0)) -> None:
    """Patches ``pipe`` in place so that a plain ``pipe(...)`` call makes head-level PAG guided samples.

    Args:
        pipe: a supported diffusers pipeline (see ``PIPELINE_ROW_LAYOUTS``).
        heads: the heads to perturb: a :class:`HeadSet` or anything it parses (``"4:0,4:3@0.5"``, tuples, dicts).
        scale: PAG scale ``w`` (>= 0; 0 computes no perturbed rows).
        u: overrides every head's coefficient (SoftPAG when < 1); None keeps the HeadSet's values.
        mode: ``"joint"`` (identity over the whole sequence) or ``"image"`` (diffusers' SD3 PAG: image-image block).
        interval: ``(start, stop)``: step ``i`` of ``T`` is guided iff ``start <= i / T < stop``.

    Enabling again replaces the settings (never stacks); :func:`disable` restores the pipeline exactly.
    """
    _enable(pipe, heads, scale, u, mode, interval, "fused")


def enable_eager(pipe, heads, *, scale: float = 3.0, u: float | None = None, mode: str = "joint",
                 interval: tuple[float, float] = (0.0, 1.0)) -> None:
    """Like :func:`enable_fused`, executed the straightforward way: a separate perturbed forward per guided step
    with the perturbed maps ``(1-u)*A + u*P`` materialised. The oracle and benchmark baseline."""
    _enable(pipe, heads, scale, u, mode, interval, "eager")


def disable(pipe) -> None:
    """Removes every hook headpag attached to ``pipe`` (no-op when it is not patched)."""
    denoiser = get_denoiser(pipe)
    patch = _PATCHES.pop(denoiser, None)
    if patch is not None:
        patch.remove()


def configure(pipe, *, scale: float | None = None, heads=None, u: float | None = None,
              interval: tuple[float, float] | None = None, mode: str | None = None) -> None:
    """Changes the settings of a patched pipeline between calls, without re-patching."""
    patch = _patch_of(pipe)
    if patch is None:
        raise ValueError("pipe is not patched: call headpag.enable_fused(pipe, heads) or enable_eager first")
    s = patch.settings
    new = _settings(
        patch.denoiser,
        heads if heads is not None else s.heads,
        s.scale if scale is None else scale,
        u,
        s.mode if mode is None else mode,
        s.interval if interval is None else interval,
    )
    patch._select(new)


@contextlib.contextmanager
def fused(pipe, heads, **kwargs):
    """``with headpag.fused(pipe, heads, scale=...):`` enables the fused patch for the block, then disables it."""
    enable_fused(pipe, heads, **kwargs)
    try:
        yield pipe
    finally:
        disable(pipe)
