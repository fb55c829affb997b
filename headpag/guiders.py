"""Head-level PAG as a Modular Diffusers guider: :class:`HeadPerturbedAttentionGuidance`.

diffusers' Modular pipelines (SDXL, SD3, FLUX.2, Qwen-Image, Wan, Z-Image, ...) leave guidance to a guider: per step
the denoise block asks it for the batches to run (``prepare_inputs``), calls the denoiser once per batch between
``prepare_models`` and ``cleanup_models``, and hands the predictions back to it (``guider(state)``). diffusers' own
``PerturbedAttentionGuidance`` makes a third call per step for the perturbed prediction (layer-skip hooks on whole
layers). This guider makes no third call: on a guided step its ``prepare_models`` of the cond batch attaches a
``GuiderSession`` (``headpag/guided/guider_session.py``) to the denoiser, which runs that call fused (the perturbed
twins of the cond rows appended to the batch, forking at their first fork unit, selected heads through headpag's
kernel) and returns the cond rows followed by the twins' rows; ``cleanup_models`` removes every hook again. The
guider splits them apart and combines the predictions exactly as ``PerturbedAttentionGuidance`` does.

Saving: diffusers' Modular pipelines save only components with a load id; a guider set from its config (as
``update_components(guider=HeadPerturbedAttentionGuidance(...))`` does) is recreated with the blocks' default on
load, as for diffusers' own guiders. To keep it, save the guider (``guider.save_pretrained(path)``) and set it through
``ComponentSpec(name="guider", type_hint=HeadPerturbedAttentionGuidance, pretrained_model_name_or_path=path).load()``;
``pipe.save_pretrained`` then records it and ``ModularPipeline.from_pretrained(...).load_components()`` restores it.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Mapping

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg

from .guided.guider_session import GuiderSession
from .guided.session import session_of_denoiser
from .guided.settings import EXECUTIONS, Settings, check_refresh, check_scale, make_settings
from .heads import HeadSet
from .kernels import MODES

__all__ = ["HeadPerturbedAttentionGuidance", "heads_config"]


def heads_config(heads) -> str:
    """The string form of ``heads`` kept in the guider's config (saved with the pipeline as JSON).

    ``heads``: a :class:`HeadSet`, its string form (``"4:0,4:3@0.5,12:*"``), any input ``HeadSet`` parses, a head
    file's content (``HeadSet.to_dict``) or that content as a JSON string."""
    if heads is None:
        raise ValueError("heads must be given: the heads to perturb, e.g. '4:0,4:3' or a HeadSet")
    if isinstance(heads, str) and heads.lstrip().startswith("{"):
        try:
            heads = json.loads(heads)
        except json.JSONDecodeError as err:
            raise ValueError(f"heads looks like JSON but does not parse: {err}") from err
    if isinstance(heads, Mapping) and "format" in heads:
        heads = HeadSet.from_dict(heads, source="heads")
    head_set = HeadSet.from_any(heads)
    if not head_set.layers():
        raise ValueError("heads is empty: select at least one (layer, head), e.g. '4:0' or [(4, 0)]")
    return str(head_set)


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class HeadPerturbedAttentionGuidance(BaseGuidance):
    """Head-level perturbed-attention guidance (and SoftPAG) for Modular Diffusers pipelines.

    Set it with ``pipe.update_components(guider=HeadPerturbedAttentionGuidance(heads="4:0,7:*", ...))`` on a Modular
    pipeline whose denoiser headpag supports (``headpag.list_layers``). Its config is saved with the pipeline.

    Args:
        heads: the heads to perturb: a ``HeadSet``, its string form (``"4:0,4:3@0.5,12:*"``), tuples, or a head file's
            JSON content; wildcards are resolved against the denoiser at its first guided call.
        guidance_scale: CFG scale ``s`` (as ``ClassifierFreeGuidance``: 1 turns CFG off, 0 with the original
            formulation).
        perturbed_guidance_scale: PAG scale ``w`` (>= 0).
        perturbed_guidance_start, perturbed_guidance_stop: PAG runs on step ``i`` of ``T`` iff
            ``int(start * T) < i < int(stop * T)`` (diffusers' ``PerturbedAttentionGuidance`` convention, whose
            defaults are kept: 0.01 and 0.2; note the strict ``<`` at the start: step 0 is never perturbed).
        u: overrides every head's coefficient (SoftPAG when < 1); None keeps the heads' own ``u``.
        mode: ``"joint"`` (identity over the whole sequence; what diffusers' PAG layer hooks do) or ``"image"``.
        adaptive_scale: diffusers' ``pag_adaptive_scale`` ``a``: the PAG scale at timestep ``t`` is
            ``max(0, w - a * (1000 - t))``; a step where it is 0 runs no perturbed rows.
        guidance_rescale: ``rescale_noise_cfg`` factor, against the unperturbed cond prediction.
        use_original_formulation: as ``PerturbedAttentionGuidance``: the guided prediction starts from ``pred_cond``
            instead of ``pred_uncond`` (CFG on) or ``pred_perturbed`` (CFG off).
        execution: ``"fused"`` (the twins ride in the cond call, the kernel) or ``"eager"`` (a separate perturbed
            forward inside the cond call with the maps materialised: the oracle).
        refresh: ``k`` (an integer >= 1): the perturbed rows run on the first PAG step of a sampling run and every
            ``k``-th step after it; a PAG step in between runs the plain cond batch and reuses ``cond - perturbed`` of
            the last step that ran them (times its own PAG scale). A step that does not follow the previous one
            starts a new run. 1: every PAG step runs them.
        start, stop: the steps with CFG (``int(start * T) <= i < int(stop * T)``), as every diffusers guider.
        enabled: False turns all guidance off (the cond prediction only).

    Guided prediction with ``cond``, ``uncond`` and ``perturbed`` (the twins'), diffusers' formulation:
    ``uncond + s * (cond - uncond) + w * (cond - perturbed)`` (CFG on), ``perturbed + w * (cond - perturbed)``
    (CFG off); with ``use_original_formulation`` the base is ``cond``. ``headpag.enable_fused(pipe, heads, scale=w)``
    on a standard pipeline is the original formulation for the PAG part (``cond + w * (cond - perturbed)`` with CFG
    off) and diffusers' for CFG.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(
        self,
        heads=None,
        guidance_scale: float = 7.5,
        perturbed_guidance_scale: float = 2.8,
        perturbed_guidance_start: float = 0.01,
        perturbed_guidance_stop: float = 0.2,
        u: float | None = None,
        mode: str = "joint",
        adaptive_scale: float = 0.0,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        execution: str = "fused",
        refresh: int = 1,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        self.heads = heads_config(heads)
        self.register_to_config(heads=self.heads)  # a HeadSet or a dict is kept as its string form
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(
                guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        self.guidance_scale = float(guidance_scale)
        self.perturbed_guidance_scale = check_scale(perturbed_guidance_scale, "perturbed_guidance_scale")
        self.perturbed_guidance_start = _fraction(perturbed_guidance_start, "perturbed_guidance_start")
        self.perturbed_guidance_stop = _fraction(perturbed_guidance_stop, "perturbed_guidance_stop")
        if self.perturbed_guidance_stop < self.perturbed_guidance_start:
            raise ValueError(f"perturbed_guidance_stop must be >= perturbed_guidance_start "
                             f"({perturbed_guidance_start}), got {perturbed_guidance_stop}")
        self.u = None if u is None else _fraction(u, "u")
        self.mode = mode
        self.adaptive_scale = check_scale(adaptive_scale, "adaptive_scale")
        self.guidance_rescale = _fraction(guidance_rescale, "guidance_rescale")
        for name, flag in (("use_original_formulation", use_original_formulation), ("enabled", enabled)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.use_original_formulation = use_original_formulation
        self.execution = execution
        self.refresh = check_refresh(refresh)
        self._settings: weakref.WeakKeyDictionary[torch.nn.Module, Settings] = weakref.WeakKeyDictionary()
        self._session: GuiderSession | None = None
        self._perturbed_scale: float | None = None  # the PAG scale of this step, once its cond batch ran
        self._base_rows: int | None = None  # the rows of that batch (the twins' rows follow them)
        self._reusing = False  # this step reuses self._difference instead of running the twins
        # (step, cond - perturbed, the denoiser that made it) of the last twins
        self._difference: tuple[int, torch.Tensor, weakref.ref] | None = None
        self._cond_denoiser: weakref.ref | None = None  # the denoiser of this step's cond batch

    # --- which batches, which steps ------------------------------------------------------------------------
    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        return [self._prepare_batch(data, index, name) for index, name in self._batches()]

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        return [self._prepare_batch_from_block_state(input_fields, data, index, name)
                for index, name in self._batches()]

    def _batches(self) -> list[tuple[int, str]]:
        """``(tuple index, prediction name)`` of each denoiser call of this step: cond, then uncond under CFG (the
        perturbed rows ride in the cond call)."""
        return [(0, "pred_cond"), (1, "pred_uncond")][: self.num_conditions]

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 1 + int(self._is_cfg_enabled())

    def _in_range(self, start: float, stop: float, strict_start: bool) -> bool:
        if self._num_inference_steps is None:
            return True
        first, end = int(start * self._num_inference_steps), int(stop * self._num_inference_steps)
        return (first < self._step if strict_start else first <= self._step) and self._step < end

    def _is_cfg_enabled(self) -> bool:
        """diffusers' ``ClassifierFreeGuidance`` rule."""
        off = 0.0 if self.use_original_formulation else 1.0
        return self._enabled and self._in_range(self._start, self._stop, False) and not math.isclose(
            self.guidance_scale, off)

    def perturbed_scale(self) -> float:
        """The PAG scale of the current step (``adaptive_scale`` applied; 0 outside the PAG range)."""
        if not self._enabled or not self._in_range(self.perturbed_guidance_start, self.perturbed_guidance_stop, True):
            return 0.0
        if not self.adaptive_scale or self._timestep is None:
            return self.perturbed_guidance_scale
        t = float(torch.as_tensor(self._timestep).flatten()[0])
        return max(0.0, self.perturbed_guidance_scale - self.adaptive_scale * (1000.0 - t))

    # --- the denoiser calls -------------------------------------------------------------------------------
    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        previous = self._step
        super().set_state(step, num_inference_steps, timestep)
        if previous is None or step != previous + 1:  # a new sampling run
            self._difference = None
        self._perturbed_scale, self._reusing = None, False

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        """Before the cond call of a guided step: attaches a session to ``denoiser`` that runs it with the twins."""
        self._count_prepared += 1
        if session_of_denoiser(denoiser) is not None:
            raise RuntimeError(
                f"this {type(denoiser).__name__} carries headpag's enable_fused / enable_eager patch of a standard "
                f"pipeline: call headpag.disable on that pipeline before using HeadPerturbedAttentionGuidance"
            )
        scale = self.perturbed_scale()
        if self._count_prepared != 1 or scale <= 0:
            return
        self._cond_denoiser = weakref.ref(denoiser)
        known = self._difference
        if known is not None and known[2]() is denoiser and 0 < self._step - known[0] < self.refresh:
            self._perturbed_scale, self._reusing = scale, True
            return
        self._remove_session()
        self._session = GuiderSession(denoiser, self.execution, self._settings_for(denoiser))
        self._session.armed = (self._step if self._step is not None else -1, scale)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        """After each call: the session (if any) is removed; the twins' scale is kept for :meth:`forward`."""
        session = self._session
        if session is None:
            return
        ran = session.base_rows is not None
        self._remove_session()
        if not ran:
            raise RuntimeError(
                f"{type(denoiser).__name__} made no call between prepare_models and cleanup_models of the guided cond "
                f"batch of HeadPerturbedAttentionGuidance: no perturbed prediction exists for this step"
            )
        self._perturbed_scale = session.armed[1]
        self._base_rows = session.base_rows

    def _remove_session(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            session.remove()

    def _settings_for(self, denoiser: torch.nn.Module) -> Settings:
        """The guider's settings with the heads resolved against ``denoiser`` (once per denoiser)."""
        if denoiser not in self._settings:
            self._settings[denoiser] = make_settings(denoiser, self.heads, self.perturbed_guidance_scale, self.u,
                                                     self.mode, (0.0, 1.0), self.adaptive_scale)
        return self._settings[denoiser]

    # --- the guided prediction -------------------------------------------------------------------------------
    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        w = self._perturbed_scale
        shift = None  # cond - perturbed
        if w is not None and self._reusing:
            shift = self._difference[1]
            if shift.shape != pred_cond.shape:
                raise RuntimeError(
                    f"HeadPerturbedAttentionGuidance(refresh={self.refresh}): step {self._step} reuses the difference "
                    f"of step {self._difference[0]}, of shape {tuple(shift.shape)}, but this step's cond prediction "
                    f"has shape {tuple(pred_cond.shape)}: a new sampling run started right after the step of the "
                    f"last one; use a new guider (guider.new()) per run, or refresh=1"
                )
            pred_perturbed = pred_cond - shift
        elif w is not None:
            n = self._base_rows
            if pred_cond.shape[0] != 2 * n:
                raise RuntimeError(
                    f"HeadPerturbedAttentionGuidance: the cond prediction has {pred_cond.shape[0]} rows, expected "
                    f"{2 * n} ({n} cond rows and their perturbed twins): the denoise block changed the rows of the "
                    f"prediction, which this guider cannot read"
                )
            pred_cond, pred_perturbed = pred_cond[:n], pred_cond[n:]
            shift = pred_cond - pred_perturbed
            if self.refresh > 1:
                self._difference = (self._step, shift, self._cond_denoiser)
        cfg = self._is_cfg_enabled()
        if shift is None and not cfg:
            pred = pred_cond
        elif shift is None:
            pred = (pred_cond if self.use_original_formulation else pred_uncond)
            pred = pred + self.guidance_scale * (pred_cond - pred_uncond)
        elif not cfg:
            pred = pred_cond if self.use_original_formulation else pred_perturbed
            pred = pred + w * shift
        else:
            pred = pred_cond if self.use_original_formulation else pred_uncond
            pred = pred + self.guidance_scale * (pred_cond - pred_uncond) + w * shift
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def get_state(self) -> dict:
        return {**super().get_state(), "perturbed_scale": self._perturbed_scale}
