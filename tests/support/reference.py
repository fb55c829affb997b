"""The reference fold: a plain pipeline made into the guided one by a forward hook on its denoiser.

The perturbed pass is something diffusers provides on its own (a copy of the denoiser under ``apply_layer_skip(...,
skip_attention_scores=True)``, or with ``PAGJointAttnProcessor2_0`` on a layer). The hook runs it on the cond rows
and adds ``delta = w * (cond - perturbed)`` to the cond and the uncond rows alike, so that the pipeline's own CFG
arithmetic gives ``uncond + s (cond - uncond) + delta`` (and ``cond + delta`` without CFG).
"""

from __future__ import annotations

from typing import Callable

import torch

from .models import denoiser


def select_rows(value, n: int, index):
    """``value`` with ``index`` applied to every tensor of leading dim ``n`` in it (dicts recursively)."""
    if isinstance(value, dict):
        return {k: select_rows(v, n, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return type(value)(select_rows(v, n, index) for v in value)
    return value[index] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n else value


def fold_hook(pipe, perturbed: Callable[[list, dict], torch.Tensor], scale: float, *, cfg: bool | None = None):
    """Register the reference fold on ``pipe``'s denoiser; returns the hook handle (``.remove()`` it).

    ``perturbed(args, kwargs)`` gets the denoiser call's arguments narrowed to the cond rows and returns the
    perturbed prediction of those rows. The cond rows are the second half with CFG (``[uncond, cond]``), every row
    without; ``cfg`` defaults to ``pipe.do_classifier_free_guidance``. A call with ``skip_layers`` (SD3's skip-layer
    guidance call, made after the main call of the same step) gets the delta of that main call."""
    state = {}

    def hook(module, args, kwargs, output):
        sample = output[0]
        if kwargs.get("skip_layers") is not None:
            return (sample + state["delta"], *output[1:])
        n = sample.shape[0]
        with_cfg = pipe.do_classifier_free_guidance if cfg is None else cfg
        cond = slice(n // 2, n) if with_cfg else slice(0, n)
        p = perturbed(select_rows(list(args), n, cond), select_rows(kwargs, n, cond))
        state["delta"] = delta = scale * (sample[cond] - p)
        out = sample.clone()
        out[cond] += delta
        if cond.start:
            out[: cond.start] += delta
        return (out, *output[1:])

    return denoiser(pipe).register_forward_hook(hook, with_kwargs=True)


def module_pass(module: torch.nn.Module) -> Callable[[list, dict], torch.Tensor]:
    """``perturbed`` for :func:`fold_hook`: ``module`` (e.g. a denoiser copy under ``apply_layer_skip``) on the
    cond rows."""
    return lambda args, kwargs: module(*args, **kwargs)[0]
