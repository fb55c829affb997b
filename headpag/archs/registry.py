"""The architecture registry: what headpag knows about each denoiser class, and the layer tables built from it.

A *layer* is one attention module whose heads can be perturbed. Every registered denoiser has one 0-based index
space over its layers, in the order its forward pass calls them. A layer's *fork unit* is the outermost module of
the denoiser's forward loop that holds it: from that unit on, the batch has to carry the perturbed twin rows.

Each model family registers one :class:`Architecture` from its own module in this package; users add their own
with :func:`register_architecture`. A model matches the most derived registered class in its MRO, so
subclasses of a registered class are supported too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from torch import nn

__all__ = [
    "Architecture", "LayerInfo", "SECOND_DENOISERS", "architecture_of", "block_list", "denoisers_of", "forward_units",
    "get_denoiser", "list_layers", "model_class_name", "named_denoisers", "register_architecture",
    "registered_architectures",
]

#: What a layer's attention covers: text and image tokens together (SD3, Flux), or image tokens only.
LAYER_KINDS = ("joint", "self")

#: Yields ``(attention module name, fork unit name)`` of every layer in forward order.
LayerWalk = Callable[[nn.Module], Iterator[tuple[str, str]]]
#: Names of the modules the denoiser's forward loop calls one after another, in forward order.
UnitList = Callable[[nn.Module], list[str]]


@dataclass(frozen=True)
class Architecture:
    """Everything headpag knows about one denoiser class.

    Attributes:
        denoiser: the diffusers model class (subclasses match too).
        kind: ``"joint"`` (a layer attends over text and image tokens) or ``"self"`` (image tokens only).
        layers: the layer walk, ``model -> (attention module name, fork unit name)`` in forward order.
        units: ``model -> [forward-loop unit names]`` in forward order (attention-free units included).
        row_args: names of the denoiser forward's per-row arguments (widened with the twins at entry).
        unit_row_args: per-row argument names of each forward-loop unit class, by class name.
        processors: class names of the attention processors accepted on a selected layer: the default ones (each
            makes one attention call, through ``dispatch_attention_fn`` or ``F.scaled_dot_product_attention``, that
            is the layer's whole attention) and the family's IP-Adapter ones (whose first call is the layer's own
            attention and whose later calls are the adapter's branch: ``guided.routing.ADDED_BRANCH_PROCESSORS``).
        sample_arg: name of the denoiser's noisy-sample argument (the first positional argument).
        text_arg: the argument holding the text tokens ``(B, n_text, C)`` of joint attention, or None.
        text_first: joint attention puts the text tokens first (Flux) rather than last (SD3).
        timestep_arg: name of the denoiser's timestep argument (Z-Image: ``t``).
        scheduler_timestep: maps the denoiser's timestep argument back to the scheduler's timestep (the PAG
            interval is read from its position in ``scheduler.timesteps``); None when the pipeline passes it as is.
        side_pass_arg: an argument that, when given, marks a call as a side pass rather than an uncond / cond call
            (SD3's ``skip_layers`` for skip-layer guidance); such calls are shifted by the step's delta, not forked.
        grouped_row_args: names in ``row_args`` that may hold ``k`` consecutive entries per row (a leading dim of
            ``k * B``, ``k > 1``), taken ``k`` at a time (Wan 2.1 FLF2V's first- and last-frame CLIP image tokens,
            ``2 B`` rows that the model folds to ``B``).
        prepare_arguments: ``bound arguments -> None``, lays out a call's arguments (a mutable mapping, changed in
            place) before headpag reads or widens them, for inputs whose rows are not along dim 0 (HiDream's
            ``(layers, B, n, C)`` Llama stack becomes the list of its layers, each ``(B, n, C)``); None: as given.
        rows_per_sample: for a denoiser that folds several rows per sample into its batch (AnimateDiff's
            ``UNetMotionModel``: a ``(B, C, F, H, W)`` sample becomes ``B * F`` frame rows, each sample's frames
            consecutive), maps the call's bound arguments to that count ``F``; None: one row per sample. Per-row
            tensors of ``B * F`` rows (inside the denoiser, and arguments the pipeline folded already) are then
            taken ``F`` rows per sample, and the attention of a selected layer sees ``B * F`` rows.
        perturbed_attention: for a ``"self"`` family whose default self-attention is no softmax attention that
            headpag's kernel computes (Sana's ReLU linear attention, which calls no attention function at all):
            ``perturbed_attention(attn, args, kwargs, u, materialise)`` runs the forward of the selected attention
            module ``attn`` (called with ``args`` / ``kwargs``) with the per-(row, head) coefficients ``u``
            (float32 ``(rows, heads)``): per head ``((1 - u) A + u I) V``, ``A`` the layer's own attention maps.
            ``materialise`` (eager execution) builds ``A`` explicitly: the oracle. None: the layer's attention call
            is routed to headpag's kernel.
        row_lists: the per-row arguments (a subset of ``row_args``) passed as a Python list with one tensor per row
            (Z-Image's ``x`` and ``cap_feats``): widened by appending the cond rows' entries. When ``sample_arg`` is
            one, the denoiser's output sample is a list of per-row tensors too.
        text_length: ``bound arguments -> n_text`` for a ``text_arg`` that is not a ``(B, n_text, C)`` tensor (the
            number of text tokens in the joint sequence, e.g. Z-Image's padded caption length; it may return None
            when the rows of the call hold their text at different positions, which ``mode="image"`` then refuses);
            None reads ``text_arg``'s dim 1.
    """

    denoiser: type
    kind: str
    layers: LayerWalk
    units: UnitList
    row_args: tuple[str, ...]
    unit_row_args: Mapping[str, tuple[str, ...]]
    processors: tuple[str, ...]
    sample_arg: str = "hidden_states"
    text_arg: str | None = None
    text_first: bool = False
    timestep_arg: str = "timestep"
    scheduler_timestep: Callable[[Any], Any] | None = None
    side_pass_arg: str | None = None
    row_lists: tuple[str, ...] = ()
    grouped_row_args: tuple[str, ...] = ()
    text_length: Callable[[Mapping[str, Any]], int | None] | None = None
    rows_per_sample: Callable[[Mapping[str, Any]], int] | None = None
    prepare_arguments: Callable[[Any], None] | None = None
    perturbed_attention: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.denoiser, type) or not issubclass(self.denoiser, nn.Module):
            raise TypeError(f"Architecture.denoiser must be an nn.Module subclass, got {self.denoiser!r}")
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"Architecture.kind must be one of {LAYER_KINDS}, got {self.kind!r}")
        for field_name in ("layers", "units"):
            if not callable(getattr(self, field_name)):
                raise TypeError(f"Architecture.{field_name} must be a callable taking the model, got "
                                f"{getattr(self, field_name)!r}")
        _check_names("row_args", self.row_args)
        _check_names("processors", self.processors)
        if not isinstance(self.unit_row_args, Mapping) or not all(isinstance(k, str) for k in self.unit_row_args):
            raise TypeError(f"Architecture.unit_row_args must map unit class names to tuples of argument names, got "
                            f"{self.unit_row_args!r}")
        for unit, names in self.unit_row_args.items():
            _check_names(f"unit_row_args[{unit!r}]", names)
        if not isinstance(self.text_first, bool):
            raise TypeError(f"Architecture.text_first must be a bool, got {self.text_first!r}")
        if self.scheduler_timestep is not None and not callable(self.scheduler_timestep):
            raise TypeError(f"Architecture.scheduler_timestep must be a callable or None, got {self.scheduler_timestep!r}")
        if not isinstance(self.row_lists, tuple) or not set(self.row_lists) <= set(self.row_args):
            raise TypeError(f"Architecture.row_lists must be a tuple of names in row_args, got {self.row_lists!r}")
        if not isinstance(self.grouped_row_args, tuple) or not set(self.grouped_row_args) <= set(self.row_args):
            raise TypeError(f"Architecture.grouped_row_args must be a tuple of names in row_args, got "
                            f"{self.grouped_row_args!r}")
        for field_name in ("text_length", "rows_per_sample", "perturbed_attention", "prepare_arguments"):
            value = getattr(self, field_name)
            if value is not None and not callable(value):
                raise TypeError(f"Architecture.{field_name} must be a callable or None, got {value!r}")
        if self.perturbed_attention is not None and self.kind != "self":
            raise ValueError("Architecture.perturbed_attention is for 'self' architectures (no text tokens in the "
                             "layer: mode 'joint' and 'image' are the same identity)")
        if self.kind == "joint" and self.text_arg is None:
            raise ValueError("Architecture.text_arg must name the text-token argument of a 'joint' architecture "
                             "(mode='image' reads the text length from it)")
        parameters = inspect.signature(self.denoiser.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        named = {"sample_arg": self.sample_arg, "text_arg": self.text_arg, "side_pass_arg": self.side_pass_arg,
                 "timestep_arg": self.timestep_arg}
        named |= {f"row_args[{i}]": name for i, name in enumerate(self.row_args)}
        for field_name, name in named.items():
            if name is None and field_name in ("text_arg", "side_pass_arg"):
                continue
            if not isinstance(name, str) or (name not in parameters and not takes_any):
                raise ValueError(f"Architecture.{field_name} must name an argument of {self.denoiser.__name__}.forward "
                                 f"({', '.join(p for p in parameters if p != 'self')}), got {name!r}")

    @property
    def name(self) -> str:
        return self.denoiser.__name__

    def unit_args(self, unit: nn.Module, name: str = "") -> tuple[str, ...]:
        """The per-row arguments of the forward-loop unit ``name``, found by its class name along the MRO."""
        for cls in type(unit).__mro__:
            if cls.__name__ in self.unit_row_args:
                return self.unit_row_args[cls.__name__]
        raise TypeError(
            f"{self.name}'s forward-loop unit {name or '?'} is a {type(unit).__name__}, whose per-row arguments "
            f"headpag does not know: add its class to unit_row_args of the registered Architecture"
        )


def _check_names(field_name: str, names) -> None:
    if not isinstance(names, tuple) or not names or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"Architecture.{field_name} must be a non-empty tuple of names, got {names!r}")


_REGISTRY: dict[type, Architecture] = {}


def register_architecture(architecture: Architecture) -> Architecture:
    """Registers (or replaces) the architecture of ``architecture.denoiser``; returns it."""
    if not isinstance(architecture, Architecture):
        raise TypeError(f"architecture must be a headpag.Architecture, got {type(architecture).__name__}")
    _REGISTRY[architecture.denoiser] = architecture
    return architecture


def registered_architectures() -> tuple[Architecture, ...]:
    """Every registered architecture, in registration order."""
    return tuple(_REGISTRY.values())


def _lookup(obj: object) -> Architecture | None:
    if not isinstance(obj, nn.Module):
        return None
    for cls in type(obj).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def _unwrap(obj: object) -> object:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), else ``obj``."""
    return getattr(obj, "_orig_mod", obj) if isinstance(obj, nn.Module) else obj


#: Pipeline attributes holding a further denoiser that runs some of the steps with the same settings (Wan 2.2
#: A14B's ``transformer_2``: the low-noise expert, below ``boundary_ratio``).
SECOND_DENOISERS = ("transformer_2",)


def _primary(model_or_pipe: object) -> tuple[str, nn.Module]:
    """``(attribute, denoiser)`` of a registered model (attribute "") or of a pipeline's ``transformer`` / ``unet``."""
    obj = _unwrap(model_or_pipe)
    if _lookup(obj) is not None:
        return "", obj
    found = ""
    if not isinstance(obj, nn.Module):
        for attr in ("transformer", "unet"):
            denoiser = _unwrap(getattr(obj, attr, None))
            if denoiser is None:
                continue
            if _lookup(denoiser) is not None:
                return attr, denoiser
            found = f" (its .{attr} is a {type(denoiser).__name__})"
            break
    names = ", ".join(a.name for a in _REGISTRY.values())
    raise TypeError(
        f"unsupported model {type(model_or_pipe).__name__}{found}: expected one of {names}, or a pipeline whose "
        ".transformer or .unet is one (headpag.register_architecture adds a class)"
    )


def get_denoiser(model_or_pipe: object) -> nn.Module:
    """The registered denoiser of ``model_or_pipe`` (a pipeline's primary one: see :func:`denoisers_of`).

    ``model_or_pipe`` is a registered model (returned as is; a ``torch.compile`` wrapper is unwrapped) or a
    pipeline whose ``transformer`` or ``unet`` attribute is one. Anything else raises ``TypeError`` listing the
    registered classes.
    """
    return _primary(model_or_pipe)[1]


def named_denoisers(model_or_pipe: object) -> tuple[tuple[str, nn.Module], ...]:
    """``(attribute, denoiser)`` of every denoiser of ``model_or_pipe`` that runs steps of its loop: the primary one
    (:func:`get_denoiser`; attribute "" for a model passed itself), then each of :data:`SECOND_DENOISERS` the
    pipeline has and that is not None (Wan 2.2 A14B: ``("transformer", ...), ("transformer_2", ...)``), each once.
    A second denoiser that is no registered model raises ``TypeError`` naming it."""
    attr, primary = _primary(model_or_pipe)
    found = [(attr, primary)]
    obj = _unwrap(model_or_pipe)
    if isinstance(obj, nn.Module):
        return tuple(found)
    for name in SECOND_DENOISERS:
        denoiser = _unwrap(getattr(obj, name, None))
        if denoiser is None or any(denoiser is d for _, d in found):
            continue
        if _lookup(denoiser) is None:
            names = ", ".join(a.name for a in _REGISTRY.values())
            raise TypeError(f"unsupported second denoiser: {type(obj).__name__}.{name} is a {type(denoiser).__name__}, "
                            f"expected one of {names}")
        found.append((name, denoiser))
    return tuple(found)


def denoisers_of(model_or_pipe: object) -> tuple[nn.Module, ...]:
    """Every denoiser of ``model_or_pipe`` (:func:`named_denoisers`): ``(get_denoiser(pipe),)`` for a pipeline with
    one, ``(pipe.transformer, pipe.transformer_2)`` for Wan 2.2 A14B; a model passed itself gives ``(model,)``."""
    return tuple(denoiser for _, denoiser in named_denoisers(model_or_pipe))


def architecture_of(model_or_pipe: object) -> Architecture:
    """The registered :class:`Architecture` of a model or pipeline (``TypeError`` when there is none)."""
    return _lookup(get_denoiser(model_or_pipe))


def model_class_name(model_or_pipe: object) -> str:
    """The registered class name of the denoiser (e.g. ``"SD3Transformer2DModel"``), for file headers."""
    return architecture_of(model_or_pipe).name


@dataclass(frozen=True)
class LayerInfo:
    """One PAG layer of a denoiser.

    Attributes:
        index: 0-based position in the denoiser's forward order (one index space per model).
        name: the attention module's name as in ``model.named_modules()``, e.g. ``"transformer_blocks.3.attn"``.
        heads: number of attention heads (``attn.heads``).
        head_dim: channels per head (``attn.inner_dim // attn.heads``, the q projection's width per head).
        kind: ``"joint"`` (text and image tokens) or ``"self"`` (image tokens), from the architecture.
        fork_unit: name of the fork unit module (``model.get_submodule(fork_unit)``).
    """

    index: int
    name: str
    heads: int
    head_dim: int
    kind: str
    fork_unit: str


def list_layers(model_or_pipe: object) -> list[LayerInfo]:
    """The PAG layers of a model or pipeline, in forward order (``result[i].index == i``)."""
    model = get_denoiser(model_or_pipe)
    arch = _lookup(model)
    layers = []
    for name, fork_unit in arch.layers(model):
        attn = model.get_submodule(name)
        heads = int(attn.heads)
        layers.append(LayerInfo(len(layers), name, heads, int(attn.inner_dim) // heads, arch.kind, fork_unit))
    return layers


def forward_units(model_or_pipe: object) -> list[str]:
    """Names of the modules the denoiser's forward loop calls one after another (the candidate fork units)."""
    model = get_denoiser(model_or_pipe)
    return _lookup(model).units(model)


def block_list(*list_names: str, attention: str) -> tuple[LayerWalk, UnitList]:
    """The walk and unit list of a denoiser whose forward loop runs the blocks of ``list_names`` in order, each
    block holding one layer ``{list}.{i}.{attention}`` whose fork unit is the block itself."""

    def units(model: nn.Module) -> list[str]:
        return [f"{name}.{i}" for name in list_names for i in range(len(getattr(model, name)))]

    def layers(model: nn.Module) -> Iterator[tuple[str, str]]:
        for unit in units(model):
            yield f"{unit}.{attention}", unit

    return layers, units
