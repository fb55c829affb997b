"""Objectives that score generated images for the head search (HeadHunter).

An objective is any callable ``objective(images, prompts) -> scores``:

- ``images``: float tensor ``(B, 3, H, W)`` with values in ``[0, 1]`` (any device, any floating dtype),
- ``prompts``: list of ``B`` strings, ``prompts[i]`` being the prompt of ``images[i]``,
- ``scores``: ``B`` floats (a 1-D tensor or a sequence), higher is better; ``scores[i]`` belongs to ``images[i]``.

Built in: :class:`PickScore`, :class:`ClipScore` and :class:`Weighted` (a weighted sum of objectives);
:func:`get_objective` maps the names ``"pickscore"`` and ``"clip"`` to them. :func:`check_scores` validates what
an objective returned. :func:`objective_identity` is what a HeadHunter run directory records of an objective (a
resume under another identity is refused): an objective's ``identity()`` method or ``name`` attribute, else its
module and name; give a callable a ``name`` when variants of it (other parameters) score differently.

Models load with ``transformers`` ``from_pretrained``; every id may be a hub id or a local directory. A model that
cannot be loaded (no network and not cached, wrong id, directory without the files) raises
:class:`ObjectiveLoadError`, a subclass of :class:`OSError`, naming the id and how to use a local copy. When the
environment variable ``HF_HUB_OFFLINE`` is set (``1``/``true``/``yes``/``on``), loading passes
``local_files_only=True`` and so fails at once instead of retrying the network.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

__all__ = [
    "OBJECTIVES",
    "ClipScore",
    "Objective",
    "ObjectiveLoadError",
    "PickScore",
    "Weighted",
    "check_scores",
    "get_objective",
    "objective_identity",
]

#: ``(images (B, 3, H, W) in [0, 1], prompts: B strings) -> B scores``.
Objective = Callable[[torch.Tensor, Sequence[str]], Union[torch.Tensor, Sequence[float]]]


class ObjectiveLoadError(OSError):
    """An objective's model or processor could not be loaded (message: which id, and how to use a local copy).

    Subclasses :class:`OSError` (what ``transformers`` raises for a missing model); the original exception is
    chained as ``__cause__``."""


def _offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set to a true value (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load(loader: Callable[..., Any], name: str, role: str, owner: str, example: str) -> Any:
    """``loader(name)`` (a ``from_pretrained``), re-raising load failures as :class:`ObjectiveLoadError`.

    ``role`` is the argument that named it ("model", "processor"), ``owner`` the objective's class name and
    ``example`` a call of that class with local paths, shown in the message."""
    kwargs = {"local_files_only": True} if _offline() else {}
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as err:  # transformers: OSError; huggingface_hub id validation: ValueError
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        local = f"/path/to/{name.rstrip('/').rsplit('/', 1)[-1]}"
        raise ObjectiveLoadError(
            f"{owner}: could not load {role} {name!r} ({type(err).__name__}: {reason})\n"
            f"It is not a loadable local directory and not in the Hugging Face cache, and the hub could not be "
            f"reached (or the id is wrong). To use a local copy, download it on a machine with network,\n"
            f"    huggingface-cli download {name} --local-dir {local}\n"
            f"copy the directory here and pass its path, e.g. {example},\n"
            f"or copy that machine's Hugging Face cache here and set HF_HOME to it. "
            f"Set HF_HUB_OFFLINE=1 to fail fast when there is no network."
        ) from err


def _path(name: str | os.PathLike) -> str:
    """A hub id or a local directory (``~`` expanded, ``pathlib.Path`` accepted) as a string."""
    return os.path.expanduser(os.fspath(name))


def _features(output: Any) -> torch.Tensor:
    """The projected embeddings from ``get_image_features``/``get_text_features``: a tensor in transformers 4.x,
    a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds them in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> int:
    """Validate ``images`` ``(B, 3, H, W)`` floating and ``prompts`` ``B`` strings; return ``B``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor of shape (B, 3, H, W) in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating tensor with values in [0, 1], got dtype {images.dtype}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"prompts must be a list of {images.shape[0]} strings (one per image), got {got}")
    return images.shape[0]


class _ClipObjective:
    """Shared machinery of the CLIP-based objectives: load, preprocess, embed. Subclasses define ``_score``."""

    def __init__(self, model: str | os.PathLike, processor: str | os.PathLike, device=None, dtype=None,
                 example: str = ""):
        from transformers import AutoProcessor, CLIPModel

        owner = type(self).__name__
        self.model_name, self.processor_name = _path(model), _path(processor)
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype if dtype is not None else torch.float32
        clip = _load(CLIPModel.from_pretrained, self.model_name, "model", owner, example)
        self.processor = _load(AutoProcessor.from_pretrained, self.processor_name, "processor", owner, example)
        self.model = clip.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.max_length = clip.config.text_config.max_position_embeddings  # 77 for CLIP

    @torch.no_grad()
    def embed(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings, each float32 ``(B, D)`` on ``self.device``.

        The processor resizes and centre-crops ``images`` to the model's input size and normalises them; they go
        in as CHW float tensors with ``do_rescale=False`` (already in [0, 1]; clamped to it), not as PIL images.
        Prompts are truncated to the text model's context (77 tokens)."""
        _check_inputs(images, prompts)
        pixels = list(images.detach().to("cpu", torch.float32).clamp(0, 1))
        inputs = self.processor(
            text=list(prompts), images=pixels, return_tensors="pt", padding=True, truncation=True,
            max_length=self.max_length, do_rescale=False, input_data_format="channels_first",
        )
        image_emb = _features(self.model.get_image_features(
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype)))
        text_emb = _features(self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device)))
        image_emb, text_emb = image_emb.float(), text_emb.float()
        return image_emb / image_emb.norm(dim=-1, keepdim=True), text_emb / text_emb.norm(dim=-1, keepdim=True)

    def _score(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores of ``images`` ``(B, 3, H, W)`` in [0, 1] against ``prompts`` (``B`` strings), one call for the
        whole batch: float32 ``(B,)`` on the CPU; ``scores[i]`` pairs ``images[i]`` with ``prompts[i]``."""
        if _check_inputs(images, prompts) == 0:
            return torch.empty(0)
        with torch.no_grad():
            return self._score(*self.embed(images, prompts)).cpu()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model_name!r}, processor={self.processor_name!r}, "
                f"device={str(self.device)!r}, dtype={self.dtype})")

    def identity(self) -> str:
        """What determines the scores: the class, model, processor and dtype (not the device)."""
        return (f"{type(self).__name__}(model={self.model_name!r}, processor={self.processor_name!r}, "
                f"dtype={self.dtype})")


class PickScore(_ClipObjective):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image_emb, text_emb)`` per (image, prompt) pair,
    as in the PickScore README (normalised embeddings; the diagonal, not the B x B matrix). About 20-23 for
    typical images.

    Args:
        model: ``CLIPModel`` checkpoint, hub id or local directory.
        processor: its processor (image processor + tokenizer), hub id or local directory.
        device: where the model runs; default CUDA if available, else CPU.
        dtype: model dtype; default ``torch.float32`` (pass ``torch.float16`` to save memory).

    Raises:
        ObjectiveLoadError: (an ``OSError``) when ``model`` or ``processor`` cannot be loaded.
    """

    def __init__(self, model: str | os.PathLike = "yuvalkirstain/PickScore_v1",
                 processor: str | os.PathLike = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device=None, dtype=None):
        example = 'PickScore(model="/path/to/PickScore_v1", processor="/path/to/CLIP-ViT-H-14-laion2B-s32B-b79K")'
        super().__init__(model, processor, device, dtype, example)

    def _score(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.float().exp() * (image_emb * text_emb).sum(-1)


class ClipScore(_ClipObjective):
    """CLIP score (Hessel et al. 2021, torchmetrics' definition): ``100 * max(cos(image_emb, text_emb), 0)`` per
    (image, prompt) pair, in [0, 100].

    Args:
        model: ``CLIPModel`` checkpoint, hub id or local directory.
        device: where the model runs; default CUDA if available, else CPU.
        dtype: model dtype; default ``torch.float32``.
        processor: the processor; default: the one saved with ``model`` (``AutoProcessor.from_pretrained(model)``).

    Raises:
        ObjectiveLoadError: (an ``OSError``) when ``model`` or ``processor`` cannot be loaded.
    """

    def __init__(self, model: str | os.PathLike = "openai/clip-vit-large-patch14", device=None, dtype=None,
                 processor: str | os.PathLike | None = None):
        example = 'ClipScore(model="/path/to/clip-vit-large-patch14")'
        super().__init__(model, model if processor is None else processor, device, dtype, example)

    def _score(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return 100.0 * (image_emb * text_emb).sum(-1).clamp(min=0)


class Weighted:
    """Weighted sum of objectives: ``sum_k weight_k * objective_k(images, prompts)``.

    ``terms`` is ``[(weight, objective), ...]`` or ``{"name": (weight, objective), ...}``; an objective may also be
    a name for :func:`get_objective` (default arguments). Each term's output is validated by
    :func:`check_scores`; the result is float64 ``(B,)`` on the CPU. ``self.terms`` holds
    ``(name, weight, objective)`` triples (names are the dict keys, or ``"0"``, ``"1"``, ... for a list).
    """

    def __init__(self, terms: Sequence[tuple[float, Objective | str]] | Mapping[str, tuple[float, Objective | str]]):
        items = list(terms.items()) if isinstance(terms, Mapping) else [(str(i), t) for i, t in enumerate(terms)]
        if not items:
            raise ValueError("Weighted needs at least one (weight, objective) term")
        self.terms: list[tuple[str, float, Objective]] = []
        for name, term in items:
            if not (isinstance(term, (tuple, list)) and len(term) == 2):
                raise ValueError(f"Weighted term {name!r} must be a (weight, objective) pair, got {term!r}")
            weight, objective = term
            self.terms.append((name, float(weight), get_objective(objective)))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``sum_k w_k * scores_k`` as float64 ``(B,)`` on the CPU."""
        total = torch.zeros(len(images), dtype=torch.float64)
        for _, weight, objective in self.terms:
            total += weight * check_scores(objective(images, prompts), images, prompts)
        return total

    def __repr__(self) -> str:
        return "Weighted({" + ", ".join(f"{n!r}: ({w}, {o!r})" for n, w, o in self.terms) + "})"

    def identity(self) -> str:
        """Every term's name, weight and :func:`objective_identity`."""
        return "Weighted({" + ", ".join(f"{n!r}: ({w!r}, {objective_identity(o)})" for n, w, o in self.terms) + "})"


#: Names accepted by :func:`get_objective`.
OBJECTIVES: dict[str, type] = {"pickscore": PickScore, "clip": ClipScore}


def get_objective(name_or_callable: str | Objective, **kwargs) -> Objective:
    """The objective for a name (case-insensitive; ``"pickscore"`` -> :class:`PickScore`, ``"clip"`` ->
    :class:`ClipScore`, constructed with ``kwargs``) or a callable, returned as is.

    Raises:
        ValueError: an unknown name (the message lists the allowed ones).
        TypeError: neither a string nor a callable, or ``kwargs`` given with a callable.
    """
    allowed = ", ".join(repr(n) for n in sorted(OBJECTIVES))
    if isinstance(name_or_callable, str):
        key = name_or_callable.strip().lower()
        if key not in OBJECTIVES:
            raise ValueError(f"unknown objective {name_or_callable!r}; allowed names: {allowed}, "
                             f"or pass a callable (images, prompts) -> scores")
        return OBJECTIVES[key](**kwargs)
    if callable(name_or_callable):
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} apply only to named objectives ({allowed}), "
                            f"not to a callable")
        return name_or_callable
    raise TypeError(f"objective must be one of the names {allowed} or a callable (images, prompts) -> scores, "
                    f"got {type(name_or_callable).__name__}")


def objective_identity(objective: Any) -> str:
    """A string that names what an objective computes, as a HeadHunter run directory records it: the objective's
    ``identity()`` (the built-ins: class, model ids and dtype; :class:`Weighted`: its terms and weights), else its
    ``name`` attribute, else ``module.name`` of a function, else ``module.Class`` of a callable object."""
    identity = getattr(objective, "identity", None)
    if callable(identity):
        return str(identity())
    name = getattr(objective, "name", None)
    if isinstance(name, str) and name:
        return name
    if hasattr(objective, "__name__"):
        return f"{getattr(objective, '__module__', None)}.{objective.__name__}"
    return f"{type(objective).__module__}.{type(objective).__qualname__}"


def check_scores(scores: Any, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Validate an objective's output for ``images`` (``B`` of them) and ``prompts``; return float64 ``(B,)`` on
    the CPU.

    Accepts a tensor (any device/dtype; ``(B,)``, or e.g. ``(B, 1)`` with one non-singleton dimension), a numpy
    array, or a sequence of numbers / 0-d tensors.

    Raises:
        TypeError: not convertible to numbers.
        ValueError: not 1-D, a count other than ``B`` (message: expected and actual counts), or a NaN/inf score
            (message: the image index and its prompt).
    """
    expected = len(images)
    if isinstance(scores, torch.Tensor):
        t = scores.detach().to("cpu", torch.float64)
    else:
        try:
            t = torch.as_tensor(scores, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            try:  # e.g. a list of CUDA 0-d tensors, or a generator
                t = torch.tensor([float(s) for s in scores], dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"objective must return {expected} floats (a 1-D tensor or a sequence), got "
                                f"{type(scores).__name__}") from err
    if t.ndim != 1:
        if sum(d != 1 for d in t.shape) > 1:
            raise ValueError(f"objective must return {expected} scores as a 1-D tensor or sequence, got shape "
                             f"{tuple(t.shape)}")
        t = t.reshape(-1)
    if t.numel() != expected:
        raise ValueError(f"objective returned {t.numel()} scores for {expected} images "
                         f"(expected {expected}, got {t.numel()})")
    bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        prompt = prompts[i] if i < len(prompts) else None
        more = f"; also at indices {bad[1:11]}{' ...' if len(bad) > 11 else ''}" if len(bad) > 1 else ""
        raise ValueError(f"objective returned a non-finite score ({t[i].item()}) for image {i} "
                         f"(prompt {prompt!r}){more}")
    return t
