"""A guided session: everything headpag attaches to one denoiser, and the guided call.

Two drivers decide the calls: :class:`PipelineSession`, which ``enable_fused`` / ``enable_eager`` attach to a standard
pipeline (it reads the running pipeline's steps, rows and CFG flag and folds ``delta`` into the rows the pipeline
sees), and the Modular guider's session (``guider_session.py``, told by the guider which call is the guided cond call). A
pipeline with several denoisers (Wan 2.2 A14B's ``transformer`` and ``transformer_2``) has one session on each,
attached and removed together (:func:`attach` / :func:`detach`); each keeps its own per-call state (call states,
the delta of its step for the uncond call).

Everything is attached with diffusers' hook registry, so the denoiser keeps its identity, every processor stays
the same object, and removing the session takes away exactly what was added:

- the denoiser hook hands each call to :meth:`GuidedSession.denoise`, which asks the driver whether this step is
  guided and where the rows are, runs the guided forward and hands its output to the driver;
- fused: the per-row denoiser inputs are widened at entry with a twin of every cond row; every forward-loop unit
  before the first *fork unit* that holds a selected head runs on the base rows only (its per-row inputs
  narrowed, its outputs widened by copying the cond rows), so the twins cost nothing until the fork;
- eager: a separate forward on the cond rows with the perturbed maps materialised (the paper's way), kept as
  oracle and benchmark baseline;
- a hook on each selected attention module routes its attention to the kernel, whichever entry point the
  processor uses (``routing.py``); a selected layer that made no routable attention call raises.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline, ModularPipeline

from ..archs import (
    LayerInfo, RowLayout, architecture_of, call_pattern_of, denoisers_of, forward_units, get_denoiser, list_layers,
    named_denoisers,
)
from ..archs.pipelines import caller_local
from ..heads import HeadSet
from . import rescale
from .caches import check_no_cache
from .call_state import CallShape, CallState
from .fold import fold, guided_channels, in_interval, perturbation_delta, pipeline_step
from .hooks import ATTENTION_HOOK, DENOISER_HOOK, UNIT_HOOK, Attached, AttentionHook, DenoiserHook, UnitHook
from .routing import DISPATCH_ROUTING, check_default_processor
from .rows import bind, first_tensor, group_size, map_arguments, replace_sample, take_list, take_rows, widen, widen_list
from .settings import Settings

def guidance_rescale(pipe) -> float:
    """The ``guidance_rescale`` of the running ``__call__`` of ``pipe`` (some loops keep it in a local only)."""
    return float(caller_local(pipe, "guidance_rescale", getattr(pipe, "guidance_rescale", 0.0)) or 0.0)


@dataclass(frozen=True)
class CallDecision:
    """What one guided-step denoiser call does: ``kind`` is "shift" (a side pass, run as given and shifted by this
    step's delta), "reuse" (the base rows only, run as given, folded with an earlier step's difference), "fused" (one
    forward with the twins) or "eager" (the base forward, then a separate perturbed forward). ``args`` / ``kwargs``:
    the widened call (fused), the cond rows' call (eager) or the call as given (shift, reuse)."""

    kind: str
    layout: RowLayout | None
    call: CallState | None
    args: tuple
    kwargs: dict


class GuidedSession:
    """The hooks and settings attached to one denoiser (see the module docstring), and the guided call.

    What decides a call is the driver's: :class:`PipelineSession` reads a standard pipeline's running call (steps,
    rows, CFG) and folds ``delta`` into the rows the pipeline sees; the Modular guider's session
    (``guider_session.py``) is told by the guider. A subclass implements :meth:`_caller`, :meth:`_timing`,
    :meth:`_layout`, :meth:`_shift` and :meth:`_finish` (and :meth:`_reuses` / :meth:`_finish_reused` to skip the
    perturbed rows on some guided calls).
    """

    def __init__(self, denoiser: torch.nn.Module, execution: str, settings: Settings):
        self.denoiser = denoiser
        self.arch = architecture_of(denoiser)
        self.fused = execution == "fused"
        self.layers: list[LayerInfo] = list_layers(denoiser)
        self.units = forward_units(denoiser)
        self.unit_position = {unit: i for i, unit in enumerate(self.units)}
        self.channels = guided_channels(denoiser)
        self.call: CallState | None = None
        self.row_heads: list[HeadSet] | None = None
        self._step = -1
        self._scale = 0.0  # the PAG scale of the guided step running now (Settings.scale_at)
        self.attached = Attached()
        units = [denoiser.get_submodule(unit) for unit in self.units]
        unit_args = [self.arch.unit_args(module, unit) for module, unit in zip(units, self.units)]  # raise before hooking
        check_no_cache(denoiser)
        try:
            self.select(settings)
            self.attached.add(denoiser, DenoiserHook(self), DENOISER_HOOK)
            for position, (module, names) in enumerate(zip(units, unit_args)):
                self.attached.add(module, UnitHook(self, position, names), UNIT_HOOK)
            DISPATCH_ROUTING.acquire()
        except BaseException:
            self.attached.remove_all(denoiser)  # a half-built session leaves nothing behind
            raise

    # --- settings -------------------------------------------------------------------------------------------
    def heads_of(self, j: int) -> HeadSet:
        """Head set of perturbed row ``j``."""
        return self.row_heads[j % len(self.row_heads)] if self.row_heads else self.settings.heads

    def fork_position_of(self, heads: HeadSet) -> int:
        """Position in the forward loop of the first unit holding a head of ``heads``."""
        return min(self.unit_position[self.layers[i].fork_unit] for i in heads.layers())

    def select(self, settings: Settings, row_heads: list[HeadSet] | None = None) -> None:
        """Takes ``settings`` (and optionally one head set per perturbed row): checks and hooks the selected
        layers, unhooks layers no longer selected."""
        indices = set(settings.heads.layers()).union(*(h.layers() for h in row_heads or ()))
        selected = [self.layers[i] for i in sorted(indices)]
        modules = {layer.name: self.denoiser.get_submodule(layer.name) for layer in selected}
        for name, module in modules.items():
            check_default_processor(name, module, self.arch.processors)
        hooked = self.attached.modules(ATTENTION_HOOK)
        for module in hooked:
            if all(module is not m for m in modules.values()):
                self.attached.remove(module, ATTENTION_HOOK)
        for name, module in modules.items():
            if all(module is not m for m in hooked):
                self.attached.add(module, AttentionHook(self, name), ATTENTION_HOOK)
        self.selected_layers = selected
        self.settings = settings
        self.row_heads = row_heads
        self._call_states: dict[CallShape, CallState] = {}

    def remove(self) -> None:
        self.attached.remove_all(self.denoiser)
        DISPATCH_ROUTING.release()

    # --- what the driver decides -------------------------------------------------------------------------------
    def _caller(self) -> Any:
        """Whatever :meth:`_timing` and :meth:`_layout` read about the call being made (the running pipeline)."""
        raise NotImplementedError

    def _timing(self, caller, timestep) -> tuple[int, float] | None:
        """``(step, PAG scale)`` of a guided call at ``timestep``; None when the call is not guided."""
        raise NotImplementedError

    def _layout(self, caller, arguments: dict, batch: int, context: str | None) -> RowLayout | None:
        """The rows of a guided call; None for a side pass of the step (run as given, then :meth:`_shift`)."""
        raise NotImplementedError

    def _shift(self, out):
        """The output of a side pass of a guided step."""
        raise NotImplementedError

    def _reuses(self, layout: RowLayout) -> bool:
        """Whether this guided call runs no perturbed rows and reuses an earlier step's (``Settings.refresh``)."""
        return False

    def _finish_reused(self, out, layout: RowLayout):
        """The output of a guided call that ran the base rows only (:meth:`_reuses`)."""
        raise NotImplementedError

    def _finish(self, out, layout: RowLayout, perturbed_out):
        """The output of a guided call from the guided forward's ``out``: its twins are the perturbed rows (fused),
        or ``perturbed_out`` is the output of the separate perturbed pass (eager)."""
        raise NotImplementedError

    # --- the guided call -----------------------------------------------------------------------------------
    def call_state(self, shape: CallShape) -> CallState:
        """The call state of a batch shape, built once and reused every step (``torch.compile`` guards on it)."""
        if shape not in self._call_states:
            self._call_states[shape] = CallState(self, shape)
        return self._call_states[shape]

    # Under torch.compile the hook runs eagerly (reading the step and the rows needs host values); the model's own
    # forward, which it calls, is compiled as a frame of its own: once per batch layout (fork / no fork).
    @torch.compiler.disable(recursive=False)
    def denoise(self, forward, args: tuple, kwargs: dict, context: str | None) -> Any:
        decision = self._decide(forward, args, kwargs, context)
        if decision is None:
            return forward(*args, **kwargs)
        if decision.kind == "shift":
            return self._shift(forward(*args, **kwargs))
        if decision.kind == "reuse":
            return self._finish_reused(forward(*args, **kwargs), decision.layout)
        if decision.kind == "fused":
            return self._finish(self._run_perturbed(decision, forward), decision.layout, None)
        out = forward(*args, **kwargs)
        return self._finish(out, decision.layout, self._run_perturbed(decision, forward))

    def _run_perturbed(self, decision: CallDecision, forward):
        """The perturbed forward of ``decision`` with its call state visible to the unit and attention hooks."""
        self.call = decision.call
        try:
            return forward(*decision.args, **decision.kwargs)
        finally:
            self.call = None

    @torch.compiler.disable
    def _decide(self, forward, args: tuple, kwargs: dict, context: str | None) -> CallDecision | None:
        """What this call does, or None when it is not guided."""
        caller = self._caller()
        bound = bind(forward, args, kwargs)
        arguments = bound.arguments
        if self.arch.prepare_arguments is not None:
            self.arch.prepare_arguments(arguments)
        timestep = arguments.get(self.arch.timestep_arg)
        if self.arch.scheduler_timestep is not None:
            timestep = self.arch.scheduler_timestep(timestep)
        timing = self._timing(caller, timestep)
        if timing is None:
            return None
        check_no_cache(self.denoiser)  # a cache enabled after headpag, on any module

        self._step, self._scale = timing
        sample = arguments[self.arch.sample_arg]
        if isinstance(sample, list):  # one tensor per row (Architecture.row_lists)
            batch, sample = len(sample), sample[0]
        else:
            batch = sample.shape[0]
        side_pass = self.arch.side_pass_arg is not None and arguments.get(self.arch.side_pass_arg) is not None
        layout = None if side_pass else self._layout(caller, arguments, batch, context)
        if layout is None:
            return CallDecision("shift", None, None, args, kwargs)
        if self._reuses(layout):
            return CallDecision("reuse", layout, None, args, kwargs)
        text = arguments.get(self.arch.text_arg) if self.arch.text_arg else None
        if self.arch.text_length is not None:
            n_text = self.arch.text_length(arguments)
            if n_text is None:  # the rows place their text tokens differently
                if self.settings.mode == "image":
                    raise ValueError(
                        f"{type(self.denoiser).__name__}: the rows of this call hold their text tokens at different "
                        f"positions (prompts of different lengths), and mode='image' needs one text span per call; "
                        f"use mode='joint', or prompts of equal token length in one call"
                    )
                n_text = 0
        else:
            n_text = text.shape[1] if isinstance(text, torch.Tensor) and text.dim() == 3 else 0
        device = str(sample.device)
        frames = 1 if self.arch.rows_per_sample is None else int(self.arch.rows_per_sample(arguments))
        if self.fused:
            call = self.call_state(CallShape(layout, layout.twins, layout.n_rows, n_text, device, frames))
            args, kwargs = map_arguments(bound, self.arch.row_args, lambda v: widen(v, layout, frames),
                                         self.arch.row_lists, lambda v: widen_list(v, layout),
                                         self.arch.grouped_row_args,
                                         lambda v: widen(v, layout, group_size(v, layout.n_base)))
            return CallDecision("fused", layout, call, args, kwargs)
        call = self.call_state(CallShape(layout, range(len(layout.cond)), len(layout.cond), n_text, device, frames))
        args, kwargs = map_arguments(bound, self.arch.row_args,
                                     lambda v: take_rows(v, layout.n_base, layout.cond, frames),
                                     self.arch.row_lists, lambda v: take_list(v, layout.cond),
                                     self.arch.grouped_row_args,
                                     lambda v: take_rows(v, layout.n_base, layout.cond, group_size(v, layout.n_base)))
        return CallDecision("eager", layout, call, args, kwargs)


class PipelineSession(GuidedSession):
    """The session ``enable_fused`` / ``enable_eager`` attach to a standard pipeline's denoiser: the running
    pipeline's call says which steps are guided and where the rows are, and ``delta`` is folded into the rows the
    pipeline sees (its own CFG arithmetic then returns the guided prediction)."""

    def __init__(self, pipe, denoiser: torch.nn.Module, execution: str, settings: Settings):
        self.pipe_ref = weakref.ref(pipe)
        self.pattern = call_pattern_of(pipe)
        self._patterns: dict[type, Any] = {}  # call patterns of other pipelines sharing the denoiser
        self._step_delta: tuple[int, torch.Tensor] | None = None
        # refresh > 1: (step, cond - perturbed) of the last step that ran the perturbed rows, and the schedule of its
        # sampling run (every run's set_timesteps makes a new scheduler.timesteps tensor)
        self._difference: tuple[int, torch.Tensor] | None = None
        self._schedule: weakref.ref | None = None
        self._reuse_at: tuple[int, bool] | None = None  # the refresh decision of the step running now
        super().__init__(denoiser, execution, settings)
        self.cond_record = rescale.CondRecord()
        self.rescale_modules = rescale.hold(pipe, self.cond_record)

    def select(self, settings: Settings, row_heads: list[HeadSet] | None = None) -> None:
        super().select(settings, row_heads)
        self._difference = None  # a difference of other heads or settings is not reused

    def remove(self) -> None:
        super().remove()
        rescale.release(self.rescale_modules, self.cond_record)

    def _caller(self):
        """``(pipeline, call pattern)`` of this denoiser call: the innermost diffusers pipeline whose ``__call__`` is
        running (a pipeline sharing the patched denoiser, e.g. made by ``from_pipe``, reads its own CFG flag,
        timesteps and rows), else the patched pipeline (a direct denoiser call, as the benchmarks make). A call
        from a running Modular pipeline raises: its guider, not headpag's patch, makes the rows there."""
        frame = sys._getframe(2)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if frame.f_code.co_name == "__call__" and isinstance(candidate, (DiffusionPipeline, ModularPipeline)):
                break
            frame = frame.f_back
        if frame is not None and isinstance(candidate, ModularPipeline):
            raise RuntimeError(
                f"the {type(self.denoiser).__name__} headpag patched with enable_fused / enable_eager is being called "
                f"by the Modular pipeline {type(candidate).__name__}, whose guider makes the rows: call "
                f"headpag.disable on the patched pipeline and set headpag.guiders.HeadPerturbedAttentionGuidance as "
                f"the Modular pipeline's guider (pipe.update_components(guider=...))"
            )
        owner = self.pipe_ref()
        pipe = candidate if frame is not None else owner
        if pipe is None:
            raise RuntimeError(
                f"the pipeline headpag patched this {type(self.denoiser).__name__} for no longer exists and the call "
                f"comes from no running pipeline: call headpag.enable_fused on the pipeline that uses the denoiser"
            )
        if pipe is owner:
            return pipe, self.pattern
        if type(pipe) not in self._patterns:
            self._patterns[type(pipe)] = call_pattern_of(pipe)
        return pipe, self._patterns[type(pipe)]

    def _timing(self, caller, timestep) -> tuple[int, float] | None:
        settings = self.settings
        if isinstance(timestep, torch.Tensor) and timestep.device.type == "meta":
            # Costing on the meta device: the step cannot be read, so every call of a non-empty interval is guided.
            scale = settings.scale_at(None)
            return (-1, scale) if scale > 0 and settings.interval[0] < settings.interval[1] else None
        pipe, _ = caller
        step, n_steps, t = pipeline_step(pipe.scheduler, timestep)
        self._follow_run(pipe.scheduler.timesteps)
        scale = settings.scale_at(t)
        return (step, scale) if scale > 0 and in_interval(step, n_steps, settings.interval) else None

    def _follow_run(self, timesteps: torch.Tensor) -> None:
        """Keeps ``refresh``'s difference within one sampling run: a call on another schedule tensor than the last
        call's (each run's ``set_timesteps`` makes a new one) starts a new run."""
        if self._schedule is None or self._schedule() is not timesteps:
            self._difference = None
            self._reuse_at = None
            self._schedule = weakref.ref(timesteps)

    def _layout(self, caller, arguments: dict, batch: int, context: str | None) -> RowLayout | None:
        pipe, pattern = caller
        try:
            layout = pattern.layout(pipe, self.denoiser, arguments, batch, context)
        except AttributeError as err:  # e.g. do_classifier_free_guidance before the pipeline's first call
            raise RuntimeError(
                f"the denoiser headpag patched on {type(pipe).__name__} was called outside a pipeline call, and the "
                f"pipeline holds no state of a running call ({err}): headpag reads the rows (CFG on or off) from the "
                f"running pipeline; call the pipeline, or headpag.disable(pipe) for direct denoiser calls"
            ) from err
        if layout is not None and layout.uncond is not None and not self.rescale_modules and guidance_rescale(pipe) > 0:
            raise ValueError(
                f"guidance_rescale > 0 is not supported with headpag on {type(pipe).__name__}: its loop has no "
                f"rescale_noise_cfg headpag can point at the unperturbed cond prediction; call the pipeline with "
                f"guidance_rescale=0"
            )
        return layout

    @torch.compiler.disable
    def _shift(self, out):
        if self._step_delta is None or self._step_delta[0] != self._step:
            return out
        sample = first_tensor(out)
        return replace_sample(out, (sample.float() + self._step_delta[1]).to(sample.dtype))

    def _reuses(self, layout: RowLayout) -> bool:
        """``refresh = k``: a guided step reuses the difference of a step ``j`` of this run with ``step - j < k``;
        every call of one step gets the decision of its first (second-order schedulers, separate calls)."""
        step = self._step
        if self._reuse_at is None or self._reuse_at[0] != step or step < 0:
            known = self._difference
            reuse = known is not None and 0 < step - known[0] < self.settings.refresh
            self._reuse_at = (step, reuse)
        return self._reuse_at[1] and self._difference[1].shape[0] == len(layout.cond)

    @torch.compiler.disable
    def _finish_reused(self, out, layout: RowLayout):
        """Folds this step's scale times the reused difference into ``out``'s rows."""
        sample = first_tensor(out)
        return self._fold_delta(out, sample, layout, self._scale * self._difference[1])

    @torch.compiler.disable
    def _finish(self, out, layout: RowLayout, perturbed_out):
        """Folds ``delta`` into the base rows of ``out``."""
        sample = first_tensor(out)
        base = sample[: layout.n_base]
        perturbed = sample[layout.n_base:] if perturbed_out is None else first_tensor(perturbed_out)
        cond = base[layout.cond.start:layout.cond.stop]
        delta = perturbation_delta(cond, perturbed, self._scale, self.channels)
        if self.settings.refresh > 1 and self._step >= 0:
            self._difference = (self._step, perturbation_delta(cond, perturbed, 1.0, self.channels))
        return self._fold_delta(out, base, layout, delta)

    def _fold_delta(self, out, base: torch.Tensor, layout: RowLayout, delta: torch.Tensor):
        """``out`` with its sample replaced by the ``n_base`` rows of ``base`` moved by ``delta``."""
        self._step_delta = (self._step, delta)
        folded = fold(base, layout, delta)
        if layout.uncond is not None:  # the pipeline's guidance_rescale measures the unmoved cond rows
            self.cond_record.set(folded[layout.cond.start:layout.cond.stop], base[layout.cond.start:layout.cond.stop])
        else:
            self.cond_record.clear()
        return replace_sample(out, folded)


# One session per denoiser; a pipeline with several denoisers (Wan 2.2 A14B's transformer and transformer_2) has one
# on each, attached and removed together.
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, PipelineSession]" = weakref.WeakKeyDictionary()


def session_of_denoiser(denoiser: torch.nn.Module) -> PipelineSession | None:
    """The pipeline session attached to ``denoiser``, or None."""
    return _SESSIONS.get(denoiser)


def session_of(pipe) -> PipelineSession | None:
    """The session attached to ``pipe``'s primary denoiser (:func:`headpag.get_denoiser`), or None."""
    return _SESSIONS.get(get_denoiser(pipe))


def sessions_of(pipe) -> tuple[tuple[str, PipelineSession | None], ...]:
    """``(attribute, session or None)`` for each denoiser of ``pipe`` (``headpag.archs.named_denoisers``), in
    order: the primary one first."""
    return tuple((name, _SESSIONS.get(denoiser)) for name, denoiser in named_denoisers(pipe))


def attach(pipe, execution: str, settings: Sequence[Settings]) -> tuple[PipelineSession, ...]:
    """Replaces any sessions on ``pipe``'s denoisers by new ones, ``settings[i]`` on ``denoisers_of(pipe)[i]``. When
    one fails to attach, none stays: ``pipe`` is left unpatched (an error on a second denoiser names it)."""
    named = named_denoisers(pipe)
    if len(settings) != len(named):
        raise ValueError(f"{len(settings)} settings for the {len(named)} denoisers of {type(pipe).__name__}")
    detach(pipe)
    attached: list[tuple[torch.nn.Module, PipelineSession]] = []
    try:
        for (name, denoiser), denoiser_settings in zip(named, settings):
            try:
                session = PipelineSession(pipe, denoiser, execution, denoiser_settings)
            except (ValueError, TypeError) as err:
                if not attached:
                    raise
                raise (ValueError if isinstance(err, ValueError) else TypeError)(f"pipe.{name}: {err}") from err
            _SESSIONS[denoiser] = session
            attached.append((denoiser, session))
    except BaseException:
        for denoiser, session in attached:
            _SESSIONS.pop(denoiser, None)
            session.remove()
        raise
    return tuple(session for _, session in attached)


def detach(pipe) -> None:
    """Removes the sessions of ``pipe``'s denoisers and any other session attached through ``pipe`` (a denoiser
    swapped out of the pipeline since) (no-op when there is none)."""
    denoisers = list(denoisers_of(pipe))
    denoisers += [d for d, s in list(_SESSIONS.items()) if s.pipe_ref() is pipe and all(d is not x for x in denoisers)]
    for denoiser in denoisers:
        session = _SESSIONS.pop(denoiser, None)
        if session is not None:
            session.remove()
