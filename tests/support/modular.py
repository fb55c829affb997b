"""Tiny Modular Diffusers pipelines built from the tiny standard pipelines' components (no hub).

:func:`modular` takes a standard pipeline from the family builders and returns the family's Modular pipeline over the
same components, without its text-encoder block (the tests pass seeded embeddings, as they do to the standard
pipelines). :data:`FAMILIES` lists, per family, the standard pipeline, its call, the Modular blocks, the heads the
tests guide and how the call's CFG scale is named; :func:`modular_call` turns a standard call into a Modular one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import diffusers.modular_pipelines as modular_pipelines
import torch
from diffusers.utils import logging

from . import models as M
from . import models_flux2 as F2
from . import models_qwen as Q
from . import models_wan as W
from . import models_zimage as Z


@dataclass(frozen=True)
class ModularFamily:
    """A family with a Modular pipeline: ``build()`` the standard pipeline, ``make_inputs`` its call maker (its CFG
    scale keyword ``cfg_name``, default ``default_cfg``), ``blocks`` the name of the Modular blocks class, ``heads``
    to guide."""

    build: Callable
    make_inputs: Callable[..., dict]
    blocks: str
    heads: str
    default_cfg: float
    cfg_name: str = "cfg"

    def inputs(self, cfg: float | None = None, steps: int = 3) -> dict:
        """The standard pipeline's call with CFG scale ``cfg`` (default ``default_cfg``) and ``steps`` steps."""
        return self.make_inputs(**{self.cfg_name: self.default_cfg if cfg is None else cfg}, steps=steps)


FAMILIES: dict[str, ModularFamily] = {
    "sd3": ModularFamily(M.sd3, M.sd3_inputs, "StableDiffusion3AutoBlocks", "1:*,2:0", 5.0),
    "sdxl": ModularFamily(M.sdxl, M.sdxl_inputs, "StableDiffusionXLAutoBlocks", "1:1,2:*", 5.0),
    "flux2-klein": ModularFamily(F2.klein, F2.klein_inputs, "Flux2KleinBaseAutoBlocks", "0:1,2:*", 4.0),
    "qwenimage": ModularFamily(Q.pipeline, Q.inputs, "QwenImageAutoBlocks", "1:*", 4.0, "true_cfg_scale"),
    "zimage": ModularFamily(Z.zimage, Z.zimage_inputs, "ZImageAutoBlocks", "1:0,1:1", 4.0),
    "wan": ModularFamily(W.wan, W.wan_inputs, "WanBlocks", "1:*", 5.0),
}


def modular(pipe, blocks: str):
    """The Modular pipeline of blocks class ``blocks`` over ``pipe``'s components, without its text encoder."""
    logging.set_verbosity_error()  # "Guiders are experimental", "created from config" on every guider
    steps = getattr(modular_pipelines, blocks)()
    steps.sub_blocks.pop("text_encoder")
    mp = steps.init_pipeline()
    mp.update_components(**{k: v for k, v in pipe.components.items() if v is not None})
    mp.set_progress_bar_config(disable=True)
    return mp


def modular_call(inputs: dict) -> dict:
    """The Modular pipeline's keyword arguments for a standard call ``inputs``: the CFG scale and output type go (the
    guider and ``output="latents"`` hold them)."""
    drop = {"guidance_scale", "true_cfg_scale", "output_type"}
    return {k: v for k, v in inputs.items() if k not in drop}


def cfg_scale(family: str, inputs: dict) -> float:
    """The CFG scale of a standard call ``inputs`` of ``family``."""
    name = "true_cfg_scale" if FAMILIES[family].cfg_name == "true_cfg_scale" else "guidance_scale"
    return float(inputs[name])


def run_modular(mp, guider, inputs: dict, seed: int = 0) -> torch.Tensor:
    """The final latents of ``mp`` with ``guider`` set, from a freshly seeded generator."""
    mp.update_components(guider=guider)
    with torch.no_grad():
        return mp(**inputs, generator=torch.Generator().manual_seed(seed), output="latents")


def decoded_modular(mp, guider, inputs: dict, seed: int = 0) -> torch.Tensor:
    """The decoded images (videos) of ``mp`` with ``guider`` set, as a tensor: the form a standard pipeline's output
    shares with the Modular one (their latent outputs are packed differently in some families)."""
    mp.update_components(guider=guider)
    with torch.no_grad():
        state = mp(**inputs, generator=torch.Generator().manual_seed(seed), output_type="pt")
    return state.values.get("images", state.values.get("videos"))


def decoded_standard(pipe, inputs: dict, seed: int = 0) -> torch.Tensor:
    """The decoded images (videos) of the standard pipeline's call ``inputs``, as a tensor."""
    with torch.no_grad():
        out = pipe(**{**inputs, "output_type": "pt"}, generator=torch.Generator().manual_seed(seed))
    return out.frames if hasattr(out, "frames") else out.images
