"""Inputs of the HeadHunter tests on the tiny SD3: two prompts with fixed embeddings, and a brightness objective."""

from __future__ import annotations

import torch

from . import models

PROMPTS = ["a cat", "a dog"]


def _embeddings():
    g = torch.Generator().manual_seed(123)
    return {p: (torch.randn(1, models.TEXT_LEN, 32, generator=g), torch.randn(1, 16, generator=g)) for p in PROMPTS}


EMBEDS = _embeddings()


def encode(texts):
    """The ``encode`` of :func:`headpag.hunt`: prompt and pooled embeddings of ``texts``."""
    return {"prompt_embeds": torch.cat([EMBEDS[t][0] for t in texts]),
            "pooled_prompt_embeds": torch.cat([EMBEDS[t][1] for t in texts])}


def brightness(images, prompts):
    """A differentiable-free toy objective: each image's mean value."""
    return images.mean(dim=(1, 2, 3))
