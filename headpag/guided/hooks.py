"""The three diffusers ``ModelHook``s of a guided session and the bookkeeping that removes them exactly.

- :class:`DenoiserHook` on the denoiser hands every call to the session (which decides, forks and folds);
- :class:`UnitHook` on every forward-loop unit runs it on the base rows and the twins forked by then;
- :class:`AttentionHook` on every selected attention module routes its attention to the kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..kernels import perturbed_attention_from_plan, reference_attention
from .routing import LayerRoute, routed
from .rows import Binder, map_arguments, select_rows

if TYPE_CHECKING:
    from .session import GuidedSession

DENOISER_HOOK = "headpag_guidance"
UNIT_HOOK = "headpag_rows"
ATTENTION_HOOK = "headpag_attention"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class DenoiserHook(ModelHook):
    """Hands every denoiser call to the session, with the name of diffusers' ``cache_context`` it runs under."""

    # Stateful so that diffusers' cache_context (Flux: "cond" / "uncond") reaches it.
    _is_stateful = True

    def __init__(self, session: "GuidedSession"):
        super().__init__()
        self.session = session
        self.context = StateManager(_NoState)

    def new_forward(self, module, *args, **kwargs):
        context = self.context._context
        return self.session.denoise(self.fn_ref.original_forward, args, kwargs, context.name if context else None)

    def reset_state(self, module):
        return module


class UnitHook(ModelHook):
    """Runs a forward-loop unit on the base rows and the twins that have forked by now; a twin that has not forked
    yet gets a copy of its cond row's output."""

    def __init__(self, session: "GuidedSession", position: int, row_args: tuple[str, ...]):
        super().__init__()
        self.session = session
        self.position = position
        self.row_args = row_args
        self.bind = Binder()

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        call = self.session.call
        rows = call.unit_rows(self.position) if call is not None else None
        if rows is None:
            return forward(*args, **kwargs)
        args, kwargs = map_arguments(self.bind(forward, args, kwargs), self.row_args,
                                     lambda v: select_rows(v, call.n_rows, rows.run, call.frames))
        call.running = self.position
        try:
            out = forward(*args, **kwargs)
        finally:
            call.running = None
        return select_rows(out, rows.count, rows.gather, call.frames)


class AttentionHook(ModelHook):
    """Routes the attention of a selected layer to the fused kernel or to the materialised-map reference."""

    def __init__(self, session: "GuidedSession", layer: str):
        super().__init__()
        self.session = session
        self.layer = layer

    def new_forward(self, module, *args, **kwargs):
        call = self.session.call
        forward = self.fn_ref.original_forward
        if call is None:
            return forward(*args, **kwargs)
        coefficients = call.coefficients_for(self.layer)
        family_attention = self.session.arch.perturbed_attention
        if family_attention is not None:  # an attention headpag's kernel does not compute (archs/registry.py)
            return family_attention(module, args, kwargs, coefficients.u, materialise=not self.session.fused)
        attention = perturbed_attention_from_plan if self.session.fused else reference_attention
        with routed(LayerRoute(attention, coefficients, self.layer), module.processor):
            return forward(*args, **kwargs)


class Attached:
    """The hooks one session attached, so that :meth:`remove_all` leaves every module as it was."""

    def __init__(self):
        self.hooks: list[tuple[torch.nn.Module, str]] = []
        self._new_registries: list[torch.nn.Module] = []

    def add(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        if getattr(module, "_diffusers_hook", None) is None:
            self._new_registries.append(module)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self.hooks.append((module, name))

    def remove(self, module: torch.nn.Module, name: str) -> None:
        module._diffusers_hook.remove_hook(name, recurse=False)
        self.hooks.remove((module, name))

    def modules(self, name: str) -> list[torch.nn.Module]:
        """The modules carrying a hook called ``name``."""
        return [module for module, n in self.hooks if n == name]

    def remove_all(self, root: torch.nn.Module) -> None:
        """Removes every hook, and the registries this session created on modules that had none."""
        for module, name in reversed(list(self.hooks)):
            self.remove(module, name)
        for module in self._new_registries:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and not registry.hooks:
                del module._diffusers_hook
        if hasattr(root, "_diffusers_hook"):
            root._diffusers_hook.invalidate_child_registries_cache()
