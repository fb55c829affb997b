"""Batch rows of a denoiser call: which rows are uncond / cond, which arguments are per row, and how to widen
or narrow them.

A guided call carries ``n_base`` rows (the pipeline's own ``[uncond, cond]``, ``[cond]`` or ``[cond, uncond]``)
plus one perturbed *twin* per cond row, appended after them. The per-row arguments are named per class (never
guessed from "leading dim == batch"): shared tensors such as Flux's ``txt_ids`` / ``img_ids`` or a 0-d
timestep stay as they are. Inside a named argument, containers (dicts, lists, tuples: ``added_cond_kwargs``,
ControlNet residual lists, UNet skip tuples) are walked and every tensor whose leading dim is the row count is
treated as per row.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Per-row arguments of each denoiser's forward.
DENOISER_ROW_ARGS: dict[str, tuple[str, ...]] = {
    "SD3Transformer2DModel": (
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "block_controlnet_hidden_states",
        "joint_attention_kwargs",
    ),
    "FluxTransformer2DModel": (
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance", "joint_attention_kwargs",
        "controlnet_block_samples", "controlnet_single_block_samples",
    ),
    "UNet2DConditionModel": (
        "sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
        "cross_attention_kwargs", "added_cond_kwargs", "down_block_additional_residuals", "mid_block_additional_residual",
        "down_intrablock_additional_residuals", "encoder_attention_mask",
    ),
    "PixArtTransformer2DModel": (
        "hidden_states", "encoder_hidden_states", "timestep", "added_cond_kwargs", "cross_attention_kwargs",
        "attention_mask", "encoder_attention_mask",
    ),
    "DiTTransformer2DModel": ("hidden_states", "timestep", "class_labels", "cross_attention_kwargs"),
}

# Per-row arguments of each fork-unit class (the modules of the denoiser's forward loop).
_TRANSFORMER_BLOCK = ("hidden_states", "encoder_hidden_states", "temb", "joint_attention_kwargs")
UNIT_ROW_ARGS: dict[str, tuple[str, ...]] = {
    "JointTransformerBlock": _TRANSFORMER_BLOCK,
    "FluxTransformerBlock": _TRANSFORMER_BLOCK,
    "FluxSingleTransformerBlock": _TRANSFORMER_BLOCK,
    "BasicTransformerBlock": (
        "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
        "cross_attention_kwargs", "class_labels", "added_cond_kwargs",
    ),
    "CrossAttnDownBlock2D": (
        "hidden_states", "temb", "encoder_hidden_states", "attention_mask", "cross_attention_kwargs",
        "encoder_attention_mask", "additional_residuals",
    ),
    "DownBlock2D": ("hidden_states", "temb"),
    "UNetMidBlock2DCrossAttn": (
        "hidden_states", "temb", "encoder_hidden_states", "attention_mask", "cross_attention_kwargs",
        "encoder_attention_mask",
    ),
    "UNetMidBlock2D": ("hidden_states", "temb"),
    "CrossAttnUpBlock2D": (
        "hidden_states", "res_hidden_states_tuple", "temb", "encoder_hidden_states", "cross_attention_kwargs",
        "attention_mask", "encoder_attention_mask",
    ),
    "UpBlock2D": ("hidden_states", "res_hidden_states_tuple", "temb"),
}


@dataclass(frozen=True)
class RowLayout:
    """The rows of one denoiser call as the pipeline made them.

    ``n_base`` rows; ``cond`` and ``uncond`` are index ranges into them (``uncond`` None without CFG).
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

    def cond_index(self, device) -> torch.Tensor:
        return torch.arange(self.cond.start, self.cond.stop, device=device)


def map_rows(value: Any, n: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Applies ``fn`` to every tensor in ``value`` (walking dicts, lists, tuples) whose leading dim is ``n``."""
    if isinstance(value, torch.Tensor):
        return fn(value) if value.dim() >= 1 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: map_rows(v, n, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [map_rows(v, n, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(map_rows(v, n, fn) for v in value)
    return value


def widen(value: Any, layout: RowLayout) -> Any:
    """Appends a copy of the cond rows (the twins) to every per-row tensor of ``n_base`` rows."""
    def fn(t):
        return torch.cat([t, t[layout.cond.start:layout.cond.stop]])

    return map_rows(value, layout.n_base, fn)


def select_rows(value: Any, n: int, index: torch.Tensor) -> Any:
    """Every per-row tensor of ``n`` rows, indexed by ``index`` (rows may repeat)."""
    return map_rows(value, n, lambda t: t.index_select(0, index.to(t.device)))


def take_rows(value: Any, n: int, rows: range) -> Any:
    """Keeps ``rows`` of every per-row tensor of ``n`` rows."""
    return map_rows(value, n, lambda t: t[rows.start:rows.stop])


def _bind(forward, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    # ``forward`` is a bound method or a hook wrapper around one: its signature has no ``self``.
    return inspect.signature(forward).bind_partial(*args, **kwargs)


def map_arguments(forward, names: tuple[str, ...], args: tuple, kwargs: dict, fn: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """Applies ``fn`` to the arguments called ``names`` of a call ``forward(*args, **kwargs)``."""
    bound = _bind(forward, args, kwargs)
    for name in names:
        if bound.arguments.get(name) is not None:
            bound.arguments[name] = fn(bound.arguments[name])
    return bound.args, bound.kwargs


def get_argument(forward, name: str, args: tuple, kwargs: dict) -> Any:
    """The value of argument ``name`` in a call ``forward(*args, **kwargs)`` (None when absent)."""
    return _bind(forward, args, kwargs).arguments.get(name)


def first_tensor(value: Any) -> torch.Tensor:
    """The sample tensor of a denoiser's output: ``(sample,)`` tuples and ``*Output`` dataclasses alike."""
    return value[0] if isinstance(value, (tuple, list)) else value.sample


def replace_sample(value: Any, sample: torch.Tensor) -> Any:
    """``value`` (tuple or ``*Output``) with its sample replaced."""
    if isinstance(value, tuple):
        return (sample, *value[1:])
    if isinstance(value, list):
        return [sample, *value[1:]]
    return type(value)(sample=sample)
