"""The reference fold: a plain pipeline made into the guided one by a forward hook on its denoiser.

The perturbed pass is something written independently of headpag: a copy of the denoiser under diffusers'
``apply_layer_skip(..., skip_attention_scores=True)`` (or its ``AttentionProcessorSkipHook``), with
``PAGJointAttnProcessor2_0`` on a layer, or with :class:`PerturbedSDPA` around one attention module
(:func:`sdpa_perturbed_copy`). The hook runs it on the cond rows and adds ``delta = w * (cond - perturbed)`` to the
cond and the uncond rows alike, so that the pipeline's own CFG arithmetic gives ``uncond + s (cond - uncond) + delta``
(and ``cond + delta`` without CFG). :func:`check_matches_reference` compares headpag (fused and eager) with it.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .checks import ENABLE, MIN_EFFECT, close, effect, guided
from .models import denoiser, run as run_images

CALLS = ("one", "separate", "each")


def select_rows(value, n: int, index):
    """``value`` with ``index`` applied to every tensor of leading dim ``n`` in it (dicts recursively), and to every
    per-row list (a list of ``n`` tensors, one a row: Z-Image's inputs)."""
    if isinstance(value, dict):
        return {k: select_rows(v, n, index) for k, v in value.items()}
    if isinstance(value, list) and len(value) == n and all(isinstance(v, torch.Tensor) for v in value):
        return value[index] if isinstance(index, slice) else [value[i] for i in index.tolist()]
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return type(value)(select_rows(v, n, index) for v in value)
    return value[index] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n else value


def fold_hook(pipe, perturbed: Callable[[list, dict], torch.Tensor], scale: float, *, cfg: bool | None = None,
              calls: str = "one", cond: str = "last", cond_inputs: Callable[[list, dict], tuple] | None = None):
    """Register the reference fold on ``pipe``'s denoiser; returns the hook handle (``.remove()`` it).

    ``perturbed(args, kwargs)`` gets the arguments of a denoiser call that runs the cond rows only and returns the
    perturbed prediction of those rows. ``cfg`` defaults to ``pipe.do_classifier_free_guidance``. ``calls``:

    - ``"one"``: each step makes one call with every row, rows being a tensor's leading dim or a per-row list's
      entries (Z-Image). With CFG the cond rows are the second half (``[uncond, cond]``, ``cond="last"``) or the
      first (``[cond, uncond]``, ``cond="first"``: Z-Image's ``[positive..., negative...]``), every row without;
      the arguments are narrowed to them (:func:`select_rows`). A call with ``skip_layers`` (SD3's skip-layer
      guidance call, made after the main call of the same step) gets the delta of that main call.
    - ``"separate"``: each step makes a cond call and then, with CFG, an uncond call (Flux true CFG, FLUX.2 klein,
      Qwen-Image): the cond call's delta is computed on its own arguments, the uncond call gets the same delta.
    - ``"each"``: every call, whatever the order of the cond and uncond calls, gets a delta recomputed on
      ``cond_inputs(args, kwargs)`` (the call's arguments with the cond embeddings: Wan), the cond prediction by a
      copy of the plain denoiser made here."""
    if calls not in CALLS or cond not in ("first", "last"):
        raise ValueError(f"calls {calls!r} not in {CALLS} or cond {cond!r} not in ('first', 'last')")
    model = denoiser(pipe)
    plain = copy.deepcopy(model) if calls == "each" else None
    state = {"calls": 0}

    def with_cfg() -> bool:
        return pipe.do_classifier_free_guidance if cfg is None else cfg

    def one(args, kwargs, output):
        sample = output[0]
        if kwargs.get("skip_layers") is not None:
            return (sample + state["delta"], *output[1:])
        n = len(sample) if isinstance(sample, list) else sample.shape[0]
        halves = [slice(0, n // 2), slice(n // 2, n)] if with_cfg() else [slice(0, n)]
        rows = halves[-1] if cond == "last" else halves[0]
        p = perturbed([select_rows(a, n, rows) for a in args], select_rows(kwargs, n, rows))
        if isinstance(sample, list):
            state["delta"] = delta = [scale * (c - q) for c, q in zip(sample[rows], p)]
            return ([entry + delta[j % len(delta)] for j, entry in enumerate(sample)], *output[1:])
        state["delta"] = delta = scale * (sample[rows] - p)
        out = sample.clone()
        for half in halves:
            out[half] += delta
        return (out, *output[1:])

    def separate(args, kwargs, output):
        uncond = with_cfg() and state["calls"] % 2 == 1
        state["calls"] += 1
        if not uncond:
            state["delta"] = scale * (output[0] - perturbed(list(args), kwargs))
        return (output[0] + state["delta"], *output[1:])

    def each(args, kwargs, output):
        args, kwargs = cond_inputs(list(args), kwargs)
        delta = scale * (plain(*args, **kwargs)[0] - perturbed(args, kwargs))
        return (output[0] + delta, *output[1:])

    hook = {"one": one, "separate": separate, "each": each}[calls]
    return model.register_forward_hook(lambda module, args, kwargs, output: hook(args, kwargs, output),
                                       with_kwargs=True)


@contextlib.contextmanager
def folded(pipe, perturbed: Callable[[list, dict], torch.Tensor], scale: float, **fold):
    """:func:`fold_hook` registered inside the block, removed on exit."""
    handle = fold_hook(pipe, perturbed, scale, **fold)
    try:
        yield pipe
    finally:
        handle.remove()


def module_pass(module: torch.nn.Module) -> Callable[[list, dict], torch.Tensor]:
    """``perturbed`` for :func:`fold_hook`: ``module`` (e.g. a denoiser copy under ``apply_layer_skip``) on the
    cond rows."""
    return lambda args, kwargs: module(*args, **kwargs)[0]


def check_matches_reference(pipe, inputs: dict, heads, perturbed: Callable[[list, dict], torch.Tensor], *,
                            scale: float, cfg: bool | None = None, calls: str = "one", cond: str = "last",
                            cond_inputs=None, kind: str = "families", label: str = "", run=run_images,
                            **settings) -> None:
    """``heads`` guided at ``scale`` (and ``settings``: mode, u), fused and eager, equals ``run`` of the plain
    pipeline under the reference fold of ``perturbed`` (``TOL[kind]``; ``label`` follows the execution in the
    message), whose output differs from the plain one by more than ``MIN_EFFECT``. ``cfg``, ``calls``, ``cond``,
    ``cond_inputs``: :func:`fold_hook`'s."""
    with folded(pipe, perturbed, scale, cfg=cfg, calls=calls, cond=cond, cond_inputs=cond_inputs):
        expected = run(pipe, inputs)
    assert effect(expected, run(pipe, inputs)) > MIN_EFFECT
    for execution in ENABLE:
        out = guided(pipe, execution, heads, inputs, run=run, scale=scale, **settings)
        close(out, expected, kind, f"{execution} {label}" if label else execution)


# --- the perturbed attention written on SDPA ----------------------------------------------------------------------


class PerturbedSDPA(TorchFunctionMode):
    """The perturbed attention written independently on SDPA ``(B, H, N, D)``: ``joint`` returns the values (the
    identity map); ``image`` masks every image-image pair off the diagonal, ``n_text`` tokens being the text, the
    first ones (``text="first"``: ``[text, image]``, FLUX.2, Qwen-Image) or the last (``"last"``: ``[image, caption]``,
    Z-Image); with ``n_text=0`` every pair off the diagonal is masked (the identity map written on SDPA). The call's
    own ``scale`` (``None``: SDPA's default) and ``attn_mask`` (text padding; added to the image-image block's
    ``-inf``, bool turned additive) are kept; the joint identity ignores the mask, as diffusers' PAG processors do."""

    def __init__(self, mode: str, n_text: int, text: str = "first"):
        super().__init__()
        if mode not in ("joint", "image") or text not in ("first", "last"):
            raise ValueError(f"mode {mode!r} / text {text!r}")
        self.mode, self.n_text, self.text = mode, n_text, text

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(("query", "key", "value"), args)) | kwargs
        q, k, v = call["query"], call["key"], call["value"]
        if self.mode == "joint":
            return v.clone()
        n = q.shape[-2]
        position = torch.arange(n)
        image = position >= self.n_text if self.text == "first" else position < n - self.n_text
        block = image[:, None] & image[None, :] & ~torch.eye(n, dtype=torch.bool)
        bias = torch.zeros(n, n, dtype=q.dtype).masked_fill(block, float("-inf"))
        mask = call.get("attn_mask")
        if mask is not None:
            bias = bias + (mask.to(q.dtype) if mask.is_floating_point()
                           else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf")))
        return func(q, k, v, attn_mask=bias, scale=call.get("scale"))


def sdpa_perturbed_copy(pipe, attention: str, mode: str, n_text: int, text: str = "first") -> torch.nn.Module:
    """A copy of ``pipe``'s denoiser whose attention module ``attention`` (a module name) runs under
    :class:`PerturbedSDPA`; for :func:`module_pass`."""
    model = copy.deepcopy(denoiser(pipe))
    attn = model.get_submodule(attention)
    original = attn.forward
    # SDPA whatever the global backend (diffusers' set_attention_backend leaves its backend active after a reset)
    attn.processor._attention_backend = "native"

    def forward(*args, **kwargs):
        with PerturbedSDPA(mode, n_text, text):
            return original(*args, **kwargs)

    attn.forward = forward
    return model
