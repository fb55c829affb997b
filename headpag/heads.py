"""HeadSet: the selected attention heads ``(layer, head)`` with a per-head perturbation coefficient ``u``.

Layers are the indices of :func:`headpag.list_layers` (one 0-based index space per model, forward order); heads are
0-based within a layer. ``u`` is the perturbation coefficient, in ``[0, 1]``: ``out = (1-u) A v + u P v``
on the perturbed rows (``u = 1``, the default, is full PAG for that head).

Accepted inputs (``HeadSet(x)`` / ``HeadSet.from_any(x)``):

- a string ``"12:3"``, ``"12:3@0.5"``, ``"12:*"`` (every head of layer 12), ``"12:*@0.5"``, or a comma-separated list
  of those (``"12:3, 12:5@0.5, 20:*"``); the empty string is the empty set;
- an iterable of ``(layer, head)`` / ``(layer, head, u)`` tuples (or of such strings); ``head`` may be ``"*"``;
  numpy and torch integers count as ints, and the rows of a 2-D integer array or tensor (``np.argwhere(mask)``)
  as tuples; bytes are refused (decode them first);
- a dict ``{layer: [heads]}`` or ``{layer: {head: u}}`` (or ``{layer: "*"}``);
- an existing HeadSet.

A head given twice (including a head of a layer that also has ``*``) is an error naming it. Layer, head and ``u``
are checked when the set is built (non-negative integers, ``u`` a number in ``[0, 1]``, not NaN); ranges need a
model: :meth:`HeadSet.resolve` (alias :meth:`HeadSet.validate`) checks them against a model, pipeline or a list of
heads per layer and returns a copy with wildcards expanded. A HeadSet is immutable and hashable.

Files (:meth:`HeadSet.save` / :meth:`HeadSet.load`) are JSON (never pickle)::

    {"format": "headpag.HeadSet", "version": 1, "model_class": "SD3Transformer2DModel" | null,
     "layers": [{"index": 0, "name": "transformer_blocks.0.attn", "heads": 24}, ...] | null,
     "entries": [[layer, head, u], ...]}        # head is "*" for an unresolved wildcard

``load(path, model)`` refuses a file written for another model class or another shape (layer count, heads per
layer).
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from .archs import list_layers, model_class_name

__all__ = ["HeadSet", "FORMAT", "FORMAT_VERSION", "SYNTAX"]

FORMAT = "headpag.HeadSet"
FORMAT_VERSION = 1
SYNTAX = (
    "'LAYER:HEAD', 'LAYER:HEAD@U', 'LAYER:*' or 'LAYER:*@U' ('*' = every head of LAYER, U in [0, 1], default 1), "
    "comma-separated, e.g. '12:3,12:5@0.5,20:*'"
)
_TOKEN = re.compile(r"^\s*(\d+)\s*:\s*(\d+|\*)\s*(?:@\s*(\S+)\s*)?$")
_WILD = "*"


class _Shape(NamedTuple):
    """What a HeadSet was resolved against: model class (None if unknown), heads per layer, layer names (or None)."""

    model_class: str | None
    heads: tuple[int, ...]
    names: tuple[str, ...] | None


Target = Any  # a model or pipeline, its list_layers() output, or a list of heads per layer


def _is_bool(x: Any) -> bool:
    """A Python, numpy or torch boolean (refused where a number is expected, although they convert to one)."""
    return isinstance(x, bool) or str(getattr(x, "dtype", "")) in ("bool", "torch.bool")


def _index(x: Any, what: str, where: str) -> int:
    """A non-negative int from an int-like (Python, numpy or 0-d tensor integers; a string of digits, as JSON dict
    keys are)."""
    if isinstance(x, str) and x.strip().isdigit():
        return int(x)
    if _is_bool(x):
        raise ValueError(f"{what} {x!r} in {where}: expected a non-negative integer")
    try:
        i = operator.index(x)
    except TypeError:
        raise ValueError(f"{what} {x!r} in {where}: expected a non-negative integer") from None
    if i < 0:
        raise ValueError(f"{what} {i} in {where}: expected a non-negative integer")
    return i


def _coef(u: Any, where: str | None = None) -> float:
    """``u`` as a float in [0, 1]; NaN, infinities, out-of-range values and non-numbers raise ValueError naming the
    entry ``where`` (when given)."""
    of = f" for {where}" if where else ""
    if _is_bool(u):
        raise ValueError(f"u={u!r}{of}: expected a number in [0, 1]")
    try:
        f = float(u)
    except (TypeError, ValueError):
        raise ValueError(f"u={u!r}{of}: expected a number in [0, 1]") from None
    if math.isnan(f):
        raise ValueError(f"u is NaN{of}: expected a number in [0, 1]")
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"u={f!r}{of} is outside the allowed range [0, 1]")
    return f


_BYTES = (bytes, bytearray, memoryview)


def _refuse_bytes(spec: Any) -> None:
    if isinstance(spec, _BYTES):
        raise TypeError(f"cannot build a HeadSet from bytes-like {type(spec).__name__}: decode it to a str first, e.g. "
                        f"HeadSet(data.decode())")


def _label(layer: Any, head: Any) -> str:
    return f"{layer}:{head}"


def _fmt_u(u: float) -> str:
    return "" if u == 1.0 else f"@{u!r}"


class _Builder:
    """Accumulates entries, normalising them and rejecting duplicates."""

    def __init__(self) -> None:
        self.heads: dict[int, dict[int, float]] = {}
        self.wild: dict[int, float] = {}

    def add(self, layer: Any, head: Any, u: Any = 1.0) -> None:
        where = _label(layer, head)
        layer = _index(layer, "layer", where)
        u = _coef(u, where)
        if isinstance(head, str) and head.strip() == _WILD:
            if layer in self.wild:
                raise ValueError(f"duplicate entry {layer}:*")
            if layer in self.heads:
                first = min(self.heads[layer])
                raise ValueError(f"duplicate head {layer}:{first}: {layer}:* also selects every head of layer {layer}")
            self.wild[layer] = u
            return
        head = _index(head, "head", where)
        if layer in self.wild:
            raise ValueError(f"duplicate head {layer}:{head}: {layer}:* already selects every head of layer {layer}")
        if head in self.heads.get(layer, ()):
            raise ValueError(f"duplicate head {layer}:{head}")
        self.heads.setdefault(layer, {})[head] = u

    def add_string(self, text: str) -> None:
        if not text.strip():
            return
        tokens = text.split(",")
        for token in tokens:
            m = _TOKEN.match(token)
            where = repr(token.strip()) + (f" (in {text!r})" if len(tokens) > 1 else "")
            if m is None:
                raise ValueError(f"bad head spec {where}: expected {SYNTAX}")
            layer, head, u = m.groups()
            if u is not None:
                try:
                    u = float(u)
                except ValueError:
                    raise ValueError(f"bad u {u!r} in head spec {where}: expected {SYNTAX}") from None
            self.add(int(layer), head, 1.0 if u is None else u)

    def add_any(self, spec: Any) -> None:
        if spec is None:
            return
        _refuse_bytes(spec)
        if isinstance(spec, HeadSet):
            for layer, u in spec._wild.items():
                self.add(layer, _WILD, u)
            for layer, heads in spec._heads.items():
                for head, u in heads.items():
                    self.add(layer, head, u)
        elif isinstance(spec, str):
            self.add_string(spec)
        elif isinstance(spec, Mapping):
            for layer, heads in spec.items():
                if isinstance(heads, str):
                    self.add_string(",".join(f"{layer}:{h.strip()}" for h in heads.split(",")))
                elif isinstance(heads, Mapping):
                    for head, u in heads.items():
                        self.add(layer, head, u)
                elif isinstance(heads, Iterable):
                    for head in heads:
                        self.add(layer, head)
                else:
                    raise ValueError(
                        f"bad value for layer {layer!r}: {heads!r}; expected a list of heads, a dict {{head: u}} or '*'"
                    )
        elif isinstance(spec, Iterable):
            for item in spec:
                _refuse_bytes(item)
                if getattr(item, "ndim", None) == 1 and hasattr(item, "tolist"):
                    item = tuple(item.tolist())  # a row of a numpy array or tensor (e.g. np.argwhere's): Python ints
                if isinstance(item, str):
                    self.add_string(item)
                elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
                    self.add(*item)
                else:
                    raise ValueError(
                        f"bad entry {item!r}: expected (layer, head), (layer, head, u) or a string {SYNTAX}"
                    )
        else:
            raise TypeError(
                f"cannot build a HeadSet from {type(spec).__name__}: expected a string ({SYNTAX}), a list of "
                "(layer, head[, u]) tuples, a dict {layer: [heads]} / {layer: {head: u}}, or a HeadSet"
            )


def _describe(target: Target) -> _Shape:
    """The shape to resolve against: a model/pipeline, list_layers() output, or a list of heads per layer."""
    if isinstance(target, _Shape):
        return target
    if isinstance(target, (list, tuple)):
        if all(hasattr(x, "heads") and hasattr(x, "name") for x in target):  # LayerInfo list
            return _Shape(None, tuple(int(x.heads) for x in target), tuple(x.name for x in target))
        return _Shape(None, tuple(_index(h, "head count", "heads per layer") for h in target), None)
    layers = list_layers(target)
    return _Shape(model_class_name(target), tuple(x.heads for x in layers), tuple(x.name for x in layers))


def _shape_label(shape: _Shape) -> str:
    return shape.model_class or "the model"


class HeadSet:
    """Selected heads ``(layer, head)`` with a coefficient ``u`` each (see the module docstring for inputs).

    ``HeadSet(spec=None)`` builds from any accepted input; ``HeadSet()`` is empty. Iteration, ``len`` and
    :meth:`u_for` need wildcards resolved (:meth:`resolve`); ``layers()``, ``in``, ``str`` and ``==`` do not.
    """

    __slots__ = ("_heads", "_wild", "_shape")

    def __init__(self, spec: Any = None) -> None:
        b = _Builder()
        b.add_any(spec)
        self._heads = b.heads
        self._wild = b.wild
        self._shape: _Shape | None = spec._shape if isinstance(spec, HeadSet) else None

    @classmethod
    def _make(cls, heads: dict[int, dict[int, float]], wild: dict[int, float], shape: _Shape | None) -> HeadSet:
        hs = cls.__new__(cls)
        hs._heads = {layer: dict(h) for layer, h in heads.items() if h}
        hs._wild = dict(wild)
        hs._shape = shape
        return hs

    @classmethod
    def from_any(cls, spec: Any) -> HeadSet:
        """``spec`` itself if it is a HeadSet, else ``HeadSet(spec)``."""
        return spec if isinstance(spec, HeadSet) else cls(spec)

    # --- resolution against a model --------------------------------------------------------------------------

    def resolve(self, target: Target) -> HeadSet:
        """Check against ``target`` and return a copy with every ``L:*`` expanded to the heads of layer L.

        ``target`` is a supported model or pipeline (see :func:`headpag.list_layers`), its ``list_layers()``
        output, or a list of heads per layer. Raises ValueError naming the offending entry and the allowed range
        when a layer or head is out of range (or a ``u`` is outside [0, 1]).
        """
        shape = _describe(target)
        n = len(shape.heads)
        for layer in sorted(set(self._heads) | set(self._wild)):
            if layer >= n:
                entry = f"{layer}:*" if layer in self._wild else _label(layer, min(self._heads[layer]))
                allowed = f"0..{n - 1}" if n else "none"
                raise ValueError(f"layer {layer} (in {entry}) out of range: {_shape_label(shape)} has {n} layers, "
                                 f"allowed {allowed}")
        heads: dict[int, dict[int, float]] = {}
        for layer in sorted(set(self._heads) | set(self._wild)):
            count = shape.heads[layer]
            where = f"layer {layer}" + (f" ({shape.names[layer]})" if shape.names else "")
            if layer in self._wild:
                heads[layer] = dict.fromkeys(range(count), _coef(self._wild[layer], f"{layer}:*"))
                continue
            for head, u in sorted(self._heads[layer].items()):
                if head >= count:
                    raise ValueError(f"head {head} (in {layer}:{head}) out of range: {where} has {count} heads, "
                                     f"allowed 0..{count - 1}")
                _coef(u, _label(layer, head))
            heads[layer] = dict(sorted(self._heads[layer].items()))
        return HeadSet._make(heads, {}, shape)

    def validate(self, target: Target) -> HeadSet:
        """Same as :meth:`resolve`: raise ValueError on any bad entry, return the resolved copy."""
        return self.resolve(target)

    @property
    def is_resolved(self) -> bool:
        """True when no ``L:*`` wildcard is left."""
        return not self._wild

    @property
    def model_class(self) -> str | None:
        """Class name of the model this set was resolved against or loaded for (None if unknown)."""
        return self._shape.model_class if self._shape else None

    @property
    def heads_per_layer(self) -> tuple[int, ...] | None:
        """Heads per layer of the model this set was resolved against or loaded for (None if unknown)."""
        return self._shape.heads if self._shape else None

    # --- queries ---------------------------------------------------------------------------------------------

    def _need_resolved(self, what: str) -> None:
        if self._wild:
            layers = ", ".join(f"{layer}:*" for layer in sorted(self._wild))
            raise ValueError(f"{what} needs the wildcards ({layers}) expanded: call resolve(model) first")

    def layers(self) -> list[int]:
        """Sorted indices of the layers with at least one selected head (wildcard layers included)."""
        return sorted(set(self._heads) | set(self._wild))

    def u_for(self, layer: int) -> dict[int, float]:
        """``{head: u}`` of one layer, sorted by head; ``{}`` for a layer with no selected head."""
        if layer in self._wild:
            self._need_resolved(f"u_for({layer})")
        return dict(sorted(self._heads.get(layer, {}).items()))

    def __iter__(self):
        """``(layer, head, u)`` sorted by layer, then head."""
        self._need_resolved("iteration")
        return iter([(layer, head, u) for layer in sorted(self._heads) for head, u in self.u_for(layer).items()])

    def __len__(self) -> int:
        """Number of selected heads."""
        self._need_resolved("len()")
        return sum(len(h) for h in self._heads.values())

    def __bool__(self) -> bool:
        return bool(self._heads or self._wild)

    def __contains__(self, item: object) -> bool:
        """``(layer, head) in hs``; a wildcard layer contains every head."""
        if not (isinstance(item, tuple) and len(item) == 2):
            return False
        layer, head = item
        return layer in self._wild or head in self._heads.get(layer, ())

    # --- derived sets ----------------------------------------------------------------------------------------

    def with_u(self, u: float) -> HeadSet:
        """The same heads, every ``u`` (wildcards included) replaced by ``u``."""
        u = _coef(u)
        return HeadSet._make({layer: dict.fromkeys(h, u) for layer, h in self._heads.items()},
                             dict.fromkeys(self._wild, u), self._shape)

    def union(self, *others: Any) -> HeadSet:
        """Heads of this set and of ``others`` (any accepted input); for a head in several, the later ``u`` wins.

        A later ``L:*`` replaces every head of layer L. A later explicit head on a layer that is still an
        unresolved ``L:*`` raises ValueError (resolve first), since the result is not expressible unresolved.
        """
        heads = {layer: dict(h) for layer, h in self._heads.items()}
        wild = dict(self._wild)
        shape = self._shape
        for other in map(HeadSet.from_any, others):
            for layer, u in other._wild.items():
                heads.pop(layer, None)
                wild[layer] = u
            for layer, h in other._heads.items():
                if layer in wild:
                    raise ValueError(f"union of {layer}:* with explicit heads of layer {layer} "
                                     f"({_label(layer, min(h))}): call resolve(model) first")
                heads.setdefault(layer, {}).update(h)
            if shape is None or (other._shape is not None and other._shape != shape):
                shape = other._shape if shape is None else None
        return HeadSet._make(heads, wild, shape)

    def __or__(self, other: Any) -> HeadSet:
        return self.union(other)

    def __ror__(self, other: Any) -> HeadSet:
        return HeadSet.from_any(other).union(self)

    # --- identity and text -----------------------------------------------------------------------------------

    def _key(self) -> tuple:
        return (tuple(sorted((layer, tuple(sorted(h.items()))) for layer, h in self._heads.items())),
                tuple(sorted(self._wild.items())))

    def __eq__(self, other: object) -> bool:
        """Same heads with the same ``u`` (the model a set was resolved against is not compared)."""
        if not isinstance(other, HeadSet):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        """The string syntax, sorted: ``"0:1,0:3@0.5,12:*"``; ``HeadSet(str(hs)) == hs``."""
        tokens = []
        for layer in self.layers():
            if layer in self._wild:
                tokens.append(f"{layer}:*{_fmt_u(self._wild[layer])}")
            else:
                tokens += [f"{layer}:{head}{_fmt_u(u)}" for head, u in sorted(self._heads[layer].items())]
        return ",".join(tokens)

    def __repr__(self) -> str:
        return f"HeadSet({str(self)!r})"

    # --- files -----------------------------------------------------------------------------------------------

    def to_dict(self, model: Target | None = None) -> dict:
        """The JSON-able file content (see the module docstring); with ``model``, resolved against it first."""
        hs = self.resolve(model) if model is not None else self
        shape = hs._shape
        layers = None
        if shape is not None:
            names = shape.names or (None,) * len(shape.heads)
            layers = [{"index": i, "name": name, "heads": h} for i, (name, h) in enumerate(zip(names, shape.heads))]
        entries = [[layer, _WILD, u] for layer, u in sorted(hs._wild.items())]
        entries += [[layer, head, u] for layer in sorted(hs._heads) for head, u in sorted(hs._heads[layer].items())]
        entries.sort(key=lambda e: e[0])
        return {"format": FORMAT, "version": FORMAT_VERSION, "model_class": shape.model_class if shape else None,
                "layers": layers, "entries": entries}

    @classmethod
    def from_dict(cls, data: Mapping, model: Target | None = None, *, source: str = "data") -> HeadSet:
        """Inverse of :meth:`to_dict`. With ``model``, refuse data for another class or shape, then resolve."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a headpag HeadSet file (expected \"format\": \"{FORMAT}\")")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source} has HeadSet format version {data.get('version')!r}; this headpag reads "
                             f"version {FORMAT_VERSION}")
        b = _Builder()
        for entry in data.get("entries") or ():
            if not isinstance(entry, list) or len(entry) != 3:
                raise ValueError(f"bad entry {entry!r} in {source}: expected [layer, head, u]")
            b.add(*entry)
        layers = data.get("layers")
        shape = None
        if layers is not None:
            try:
                heads = tuple(_index(x["heads"], "head count", source) for x in layers)
                names = tuple(x.get("name") for x in layers)
            except (TypeError, KeyError):
                raise ValueError(f"bad \"layers\" in {source}: expected a list of {{\"name\", \"heads\"}}") from None
            shape = _Shape(data.get("model_class"), heads, names if all(isinstance(n, str) for n in names) else None)
        hs = cls._make(b.heads, b.wild, shape)
        if model is not None:
            want = _describe(model)
            cls_file = data.get("model_class")
            if cls_file is not None and want.model_class is not None and cls_file != want.model_class:
                raise ValueError(f"{source} was written for {cls_file}, not {want.model_class}")
            if shape is not None and shape.heads != want.heads:
                raise ValueError(f"{source} was written for a different shape: {_describe_diff(shape, want)}")
            return hs.resolve(want)
        return hs.resolve(shape) if shape is not None else hs

    def save(self, path: str | os.PathLike, model: Target | None = None) -> None:
        """Write the set as JSON. With ``model``, resolve against it and record its class and layer shape;
        without, record the model the set was resolved against or loaded for (or ``null``)."""
        data = self.to_dict(model)
        parts = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items() if k not in ("layers", "entries")]
        for key in ("layers", "entries"):
            value = data[key]
            if not value:
                parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
            else:
                rows = ",\n".join(f"    {json.dumps(x, allow_nan=False)}" for x in value)
                parts.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        with open(path, "w", encoding="utf-8") as f:
            f.write("{\n" + ",\n".join(parts) + "\n}\n")

    @classmethod
    def load(cls, path: str | os.PathLike, model: Target | None = None) -> HeadSet:
        """Read a file written by :meth:`save`. With ``model``, refuse a file written for another model class or
        another shape (layer count, heads per layer), then resolve against the model."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)} is not a headpag HeadSet file: {e}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{os.fspath(path)} is not a headpag HeadSet file: not UTF-8 text ({e})") from None
        return cls.from_dict(data, model, source=os.fspath(path))


def _describe_diff(have: _Shape, want: _Shape) -> str:
    """Human-readable difference between a file's shape and a model's."""
    a, b = have.heads, want.heads
    model = _shape_label(want)
    if len(a) != len(b):
        return f"file has {len(a)} layers, {model} has {len(b)}"
    i = next(i for i in range(len(a)) if a[i] != b[i])
    name = f" ({want.names[i]})" if want.names else ""
    return f"layer {i}{name} has {a[i]} heads in the file, {b[i]} in {model}"
