"""Pipeline call patterns: how a pipeline lays out the uncond, cond and (headpag's) twin rows of its denoiser calls.

A pipeline is matched to a :class:`CallPattern` by its class or any base class (so subclasses work), registered
with :func:`register_pipeline` by class or by class name (each family module registers its diffusers pipelines by
name, so that none has to be imported). The built-in patterns:

- ``"uncond_cond"``: one call per step, rows ``[uncond, cond]`` when ``pipe.do_classifier_free_guidance``, else
  ``[cond]`` (SD, SDXL, SD3 and their variants);
- ``"uncond_cond_local"``: the same, with classifier-free guidance read from the local variable
  ``do_classifier_free_guidance`` of the running ``__call__`` (PixArt keeps no attribute for it);
- ``"cond_uncond"``: rows ``[cond, uncond]``, the second half all null class labels under guidance (DiT);
- ``"separate"``: the cond rows in one call under diffusers' ``cache_context("cond")``; with true CFG the uncond
  rows in a second call under ``cache_context("uncond")``, which is shifted by the cond call's delta (Flux).

Only the ``"separate"`` pattern reads the cache context. A family whose loop fits none of these subclasses
:class:`CallPattern`, overrides :meth:`CallPattern.layout`, and registers an instance.

A pipeline class that neither it nor a base class registered is matched by its loop (``loop_reading.py``).
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from .registry import architecture_of, get_denoiser

__all__ = [
    "CALL_PATTERNS", "CallPattern", "PATTERN_NAMES", "RowLayout", "SeparateCalls", "call_pattern_of", "caller_local",
    "register_pipeline",
]


@dataclass(frozen=True)
class RowLayout:
    """The rows of one denoiser call as the pipeline made them.

    ``n_base`` rows; ``cond`` and ``uncond`` are index ranges into them (``uncond`` None without CFG). A guided
    call appends one perturbed twin per cond row after the base rows.
    """

    n_base: int
    cond: range
    uncond: range | None

    @property
    def n_rows(self) -> int:
        """Rows of the guided call: the base rows plus one twin per cond row."""
        return self.n_base + len(self.cond)

    @property
    def twins(self) -> range:
        return range(self.n_base, self.n_rows)


#: The names of the built-in patterns (module docstring).
PATTERN_NAMES = ("uncond_cond", "uncond_cond_local", "cond_uncond", "separate")


@dataclass(frozen=True)
class CallPattern:
    """How a pipeline lays out the rows of one denoiser call.

    Attributes:
        name: the pattern's name (one of :data:`CALL_PATTERNS` for the built-in ones).
        cfg_off: pipeline keyword arguments that turn classifier-free guidance off (HeadHunter's default).
    """

    name: str
    cfg_off: Mapping[str, Any]

    def __post_init__(self) -> None:
        if type(self).layout is CallPattern.layout and self.name not in PATTERN_NAMES:
            raise ValueError(f"CallPattern.name must be one of {PATTERN_NAMES} (or a subclass must override layout), "
                             f"got {self.name!r}")
        if not isinstance(self.cfg_off, Mapping):
            raise TypeError(f"CallPattern.cfg_off must be a mapping of pipeline keyword arguments, got {self.cfg_off!r}")

    def layout(self, pipe, denoiser: nn.Module, arguments: Mapping[str, Any], batch: int,
               context: str | None) -> RowLayout | None:
        """The rows of a call with bound ``arguments`` and ``batch`` rows made under cache context ``context``;
        None for a call that is not an uncond / cond call of its own (it gets the step's delta added)."""
        if self.name == "separate":
            return None if context == "uncond" else RowLayout(batch, range(batch), None)
        if self.name == "cond_uncond":
            labels = arguments.get("class_labels")
            null = denoiser.config.num_embeds_ada_norm
            if batch % 2 == 0 and labels is not None and bool((labels[batch // 2:] == null).all()):
                return RowLayout(batch, range(0, batch // 2), range(batch // 2, batch))
            return RowLayout(batch, range(batch), None)
        if self.name == "uncond_cond":
            cfg = pipe.do_classifier_free_guidance
        else:
            cfg = caller_local(pipe, "do_classifier_free_guidance")
        if cfg:
            return RowLayout(batch, range(batch // 2, batch), range(0, batch // 2))
        return RowLayout(batch, range(batch), None)


@dataclass(frozen=True)
class SeparateCalls(CallPattern):
    """``"separate"`` for loops that do not name their calls: per step a cond call, then (with true CFG) an uncond
    call on the *same* sample tensor (the loop's ``latents`` / ``latent_model_input``, rebuilt by every scheduler
    step), which gets the cond call's delta added instead of twins of its own.

    ``cfg(pipe)`` says whether the running call makes the uncond calls; a call under a named ``cache_context``
    ("cond" / "uncond") is taken by its name.
    """

    cfg: Callable[[Any], bool] = lambda pipe: False
    # denoiser -> weak reference to the sample of its last cond call under CFG (consumed by the uncond call)
    _cond_sample: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = field(
        default_factory=weakref.WeakKeyDictionary, compare=False, repr=False)

    def layout(self, pipe, denoiser: nn.Module, arguments: Mapping[str, Any], batch: int,
               context: str | None) -> RowLayout | None:
        if context is not None:
            return None if context == "uncond" else RowLayout(batch, range(batch), None)
        sample = arguments[architecture_of(denoiser).sample_arg]
        if not self.cfg(pipe):
            self._cond_sample.pop(denoiser, None)
            return RowLayout(batch, range(batch), None)
        cond = self._cond_sample.pop(denoiser, None)
        if cond is not None and cond() is sample:
            return None  # the uncond call of the step whose cond call ran on this sample
        self._cond_sample[denoiser] = weakref.ref(sample)
        return RowLayout(batch, range(batch), None)



_CFG_SCALE_OFF = {"guidance_scale": 1.0}
#: The built-in patterns by name (module docstring).
CALL_PATTERNS: dict[str, CallPattern] = {
    "uncond_cond": CallPattern("uncond_cond", _CFG_SCALE_OFF),
    "uncond_cond_local": CallPattern("uncond_cond_local", _CFG_SCALE_OFF),
    "cond_uncond": CallPattern("cond_uncond", _CFG_SCALE_OFF),
    "separate": CallPattern("separate", {}),  # guidance_scale is Flux's distilled guidance; true CFG is off by default
}


_NO_DEFAULT = object()


def caller_local(pipe, name: str, default: Any = _NO_DEFAULT):
    """The local variable ``name`` of the innermost running method of ``pipe`` (its ``__call__``): what a pattern
    reads when the pipeline keeps a setting in a local only. Outside the pipeline's ``__call__``: ``default``, or a
    ``RuntimeError`` when none is given."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_locals.get("self") is pipe and name in frame.f_locals:
            return frame.f_locals[name]
        frame = frame.f_back
    if default is not _NO_DEFAULT:
        return default
    raise RuntimeError(f"{type(pipe).__name__}'s denoiser was called outside the pipeline's __call__: cannot tell its rows")


_PIPELINES: dict[type | str, CallPattern] = {}


def register_pipeline(pipeline: type | str, pattern: str | CallPattern) -> None:
    """Registers the call pattern of a pipeline class (or a class name; subclasses match too).

    ``pattern`` is a :class:`CallPattern` or the name of a built-in one: ``"uncond_cond"``,
    ``"uncond_cond_local"``, ``"cond_uncond"`` or ``"separate"`` (module docstring).
    """
    if isinstance(pattern, str):
        if pattern not in CALL_PATTERNS:
            raise ValueError(f"pattern must be one of {list(PATTERN_NAMES)} or a CallPattern, got {pattern!r}")
        pattern = CALL_PATTERNS[pattern]
    if not isinstance(pattern, CallPattern):
        raise TypeError(f"pattern must be a pattern name or a CallPattern, got {type(pattern).__name__}")
    if not isinstance(pipeline, (type, str)):
        raise TypeError(f"pipeline must be a pipeline class or a class name, got {type(pipeline).__name__}")
    _PIPELINES[pipeline] = pattern


def call_pattern_of(pipe) -> CallPattern:
    """The call pattern of ``pipe``: that of its class or nearest registered base class, else the one its loop
    follows (:func:`detect_call_pattern`, for a pipeline whose denoiser has a registered architecture; otherwise
    the ``TypeError`` of :func:`~headpag.archs.registry.get_denoiser`). ``TypeError`` naming the built-in
    patterns and :func:`register_pipeline` when neither says."""
    for cls in type(pipe).__mro__:
        for key in (cls, cls.__name__):
            if key in _PIPELINES:
                return _PIPELINES[key]
    from .loop_reading import PATTERN_MARKERS, detect_call_pattern  # it builds on this module's patterns

    detection = detect_call_pattern(type(pipe), architecture_of(get_denoiser(pipe)))
    if detection.pattern is not None:
        return detection.pattern
    names = sorted(k if isinstance(k, str) else k.__name__ for k in _PIPELINES)
    patterns = "; ".join(f"{name!r}: {what}" for name, what in PATTERN_MARKERS.items())
    raise TypeError(
        f"unsupported pipeline {type(pipe).__name__}: headpag knows the denoiser call patterns of {', '.join(names)} "
        f"and their subclasses, and reads the loop of any other pipeline, but {detection.reason}. "
        f"headpag.register_pipeline(cls, pattern) adds a pipeline whose loop follows one of the built-in patterns "
        f"(a CallPattern subclass for any other layout); what headpag looks for in a loop: {patterns}"
    )
