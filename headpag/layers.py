"""Per-architecture layer tables: which attention modules are PAG layers, in which order, and their fork units.

A *layer* is one attention module whose heads can be perturbed. Every supported denoiser has one 0-based index
space over its layers, in the order the denoiser's forward pass calls them:

- ``SD3Transformer2DModel``: layer i is ``transformer_blocks[i].attn`` (joint); SD3.5's ``attn2`` is not a layer.
  Fork unit ``transformer_blocks[i]``.
- ``FluxTransformer2DModel``: ``transformer_blocks[i].attn`` for i < ``config.num_layers``, then
  ``single_transformer_blocks[j].attn`` (all joint). Fork unit: that block.
- ``UNet2DConditionModel``: the self-attention ``attn1`` modules of ``down_blocks``, ``mid_block``, ``up_blocks``,
  in that order (cross-attention ``attn2`` is never a layer). Fork unit: the down block, the mid block or the up
  block holding the layer (``down_blocks.{i}``, ``mid_block``, ``up_blocks.{i}``).
- ``PixArtTransformer2DModel``, ``DiTTransformer2DModel``: ``transformer_blocks[i].attn1`` (self). Fork unit
  ``transformer_blocks[i]``.

The *fork unit* is the outermost module of the denoiser's forward loop that holds the layer: the point from which
the batch has to carry the perturbed twin rows (see DESIGN.md, "The fused guided step").

Deviation from DESIGN.md's Layers table: for a UNet down block DESIGN names the ``Transformer2DModel`` as the fork
unit. That is not safe: in ``CrossAttnDownBlock2D`` a later ``resnets[j]`` (SD1.5 has ``layers_per_block=2``) runs
after ``attentions[j-1]`` with the block's own, unwidened ``temb``, so a fork inside the block fails (or, when
``temb`` broadcasts, silently hides the mismatch). The fork unit of a down-block layer is therefore the
whole down block (``down_blocks.{i}``), like the mid block and the whole up block for the other UNet layers.

Note also that ``UNet2DConditionModel.named_modules()`` lists ``up_blocks`` before ``mid_block`` (registration
order); :func:`list_layers` builds the forward order explicitly.

The tables match models by class name along the MRO (restricted to classes defined in ``diffusers``), so this
module does not import diffusers and subclasses of a supported class are supported too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from torch import nn

__all__ = ["LayerInfo", "SUPPORTED_CLASSES", "forward_units", "get_denoiser", "list_layers", "model_class_name"]


@dataclass(frozen=True)
class LayerInfo:
    """One PAG layer of a denoiser.

    Attributes:
        index: 0-based position in the denoiser's forward order (one index space per model).
        name: the attention module's name as in ``model.named_modules()``, e.g. ``"transformer_blocks.3.attn"``.
        heads: number of attention heads (``attn.heads``).
        head_dim: channels per head (``attn.inner_dim // attn.heads``, the q projection's width per head).
        kind: ``"joint"`` for SD3/Flux joint text+image attention (Flux single blocks included), ``"self"``
            for image self-attention (UNet ``attn1``, PixArt, DiT).
        fork_unit: name of the fork unit module (``model.get_submodule(fork_unit)``), see the module docstring.
    """

    index: int
    name: str
    heads: int
    head_dim: int
    kind: str
    fork_unit: str


# A walk yields (attention module name, fork unit name) in forward order.
_Walk = Callable[[nn.Module], Iterator[tuple[str, str]]]


@dataclass(frozen=True)
class _Spec:
    kind: str
    walk: _Walk


def _blocks(list_name: str, attn_name: str) -> _Walk:
    """Layer ``{list_name}[i].{attn_name}`` with fork unit ``{list_name}[i]``, for every block in the list."""

    def walk(model: nn.Module) -> Iterator[tuple[str, str]]:
        for i in range(len(getattr(model, list_name))):
            yield f"{list_name}.{i}.{attn_name}", f"{list_name}.{i}"

    return walk


def _flux_walk(model: nn.Module) -> Iterator[tuple[str, str]]:
    yield from _blocks("transformer_blocks", "attn")(model)
    yield from _blocks("single_transformer_blocks", "attn")(model)


def _unet_walk(model: nn.Module) -> Iterator[tuple[str, str]]:
    units = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
    if model.mid_block is not None:
        units.append("mid_block")
    units += [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    for unit in units:
        # Inside one block, registration order is forward order (attentions[0], [1], ...; blocks in order).
        for sub, module in model.get_submodule(unit).named_modules():
            if sub.rsplit(".", 1)[-1] == "attn1" and not getattr(module, "is_cross_attention", False):
                yield f"{unit}.{sub}", unit


_SPECS: dict[str, _Spec] = {
    "SD3Transformer2DModel": _Spec("joint", _blocks("transformer_blocks", "attn")),
    "FluxTransformer2DModel": _Spec("joint", _flux_walk),
    "UNet2DConditionModel": _Spec("self", _unet_walk),
    "PixArtTransformer2DModel": _Spec("self", _blocks("transformer_blocks", "attn1")),
    "DiTTransformer2DModel": _Spec("self", _blocks("transformer_blocks", "attn1")),
}

#: Names of the supported denoiser classes (diffusers).
SUPPORTED_CLASSES: tuple[str, ...] = tuple(_SPECS)


def _spec_name(obj: object) -> str | None:
    """The supported diffusers class ``obj`` is an instance of (by MRO), or None."""
    if not isinstance(obj, nn.Module):
        return None
    for cls in type(obj).__mro__:
        if cls.__name__ in _SPECS and cls.__module__.split(".", 1)[0] == "diffusers":
            return cls.__name__
    return None


def _unwrap(obj: object) -> object:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), else ``obj``."""
    return getattr(obj, "_orig_mod", obj) if isinstance(obj, nn.Module) else obj


def get_denoiser(model_or_pipe: object) -> nn.Module:
    """The supported denoiser of ``model_or_pipe``.

    ``model_or_pipe`` is a supported model (returned as is; a ``torch.compile`` wrapper is unwrapped) or a pipeline
    whose ``transformer`` or ``unet`` attribute is one. Anything else raises ``TypeError`` listing the supported
    classes.
    """
    obj = _unwrap(model_or_pipe)
    if _spec_name(obj) is not None:
        return obj
    found = ""
    if not isinstance(obj, nn.Module):
        for attr in ("transformer", "unet"):
            denoiser = _unwrap(getattr(obj, attr, None))
            if denoiser is None:
                continue
            if _spec_name(denoiser) is not None:
                return denoiser
            found = f" (its .{attr} is a {type(denoiser).__name__})"
            break
    raise TypeError(
        f"unsupported model {type(model_or_pipe).__name__}{found}: expected one of {', '.join(SUPPORTED_CLASSES)}, "
        "or a pipeline whose .transformer or .unet is one"
    )


def list_layers(model_or_pipe: object) -> list[LayerInfo]:
    """The PAG layers of a model or pipeline, in forward order (``result[i].index == i``).

    See the module docstring for the per-class table. Raises ``TypeError`` for unsupported models.
    """
    model = get_denoiser(model_or_pipe)
    spec = _SPECS[_spec_name(model)]
    layers = []
    for name, fork_unit in spec.walk(model):
        attn = model.get_submodule(name)
        heads = int(attn.heads)
        layers.append(LayerInfo(len(layers), name, heads, int(attn.inner_dim) // heads, spec.kind, fork_unit))
    return layers


def forward_units(model_or_pipe: object) -> list[str]:
    """Names of the modules the denoiser's forward loop calls one after another (the candidate fork units), in
    forward order: SD3/PixArt/DiT ``transformer_blocks.i``; Flux double then single blocks; UNet every down
    block, the mid block, every up block (attention-free blocks included)."""
    model = get_denoiser(model_or_pipe)
    name = _spec_name(model)
    if name == "UNet2DConditionModel":
        units = [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
        units += ["mid_block"] if model.mid_block is not None else []
        return units + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    lists = ("transformer_blocks", "single_transformer_blocks") if name == "FluxTransformer2DModel" else ("transformer_blocks",)
    return [f"{attr}.{i}" for attr in lists for i in range(len(getattr(model, attr)))]


def model_class_name(model_or_pipe: object) -> str:
    """The supported diffusers class name of the denoiser (e.g. ``"SD3Transformer2DModel"``), for file headers."""
    return _spec_name(get_denoiser(model_or_pipe))
