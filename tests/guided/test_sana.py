"""Sana (ReLU linear self-attention): the layer table, the factored perturbed linear attention against diffusers'
processors, against diffusers' ``SanaPAGPipeline``, fused == eager, and the fork rows.

Guided runs need the core's ``Architecture.perturbed_attention`` (archs/sana.py): without it, a selected Sana layer
raises at its first guided step (its processor calls no attention function headpag can route).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import SanaPAGPipeline
from diffusers.models.attention_processor import PAGIdentitySanaLinearAttnProcessor2_0

import headpag
from headpag.archs.sana import perturbed_linear_attention
from support import models_pag_families as F
from support.checks import (
    MIN_EFFECT, check_fused_eager_restore, check_matches_peer, effect, fork_rows, layer_index, layer_table,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sana_pipe():
    return F.sana()


def test_sana_layers(sana_pipe):
    assert layer_table(sana_pipe) == [
        (i, f"transformer_blocks.{i}.attn1", 2, 8, "self", f"transformer_blocks.{i}") for i in range(2)
    ]
    assert [type(sana_pipe.transformer.get_submodule(l.name).processor).__name__
            for l in headpag.list_layers(sana_pipe)] == ["SanaLinearAttnProcessor2_0"] * 2


@pytest.fixture(scope="module")
def attn1():
    torch.manual_seed(0)
    return F.sana_transformer().transformer_blocks[1].attn1, torch.randn(3, 20, 16)


def test_linear_attention_u0_is_the_processor(attn1):
    """``u = 0`` everywhere: diffusers' own linear attention, bit for bit."""
    attn, x = attn1
    with torch.no_grad():
        expected = attn(x)
        out = perturbed_linear_attention(attn, (x,), {}, torch.zeros(3, attn.heads))
    assert torch.equal(out, expected)


def test_linear_attention_u1_is_diffusers_identity(attn1):
    """``u = 1`` on every head: the perturbed rows of diffusers' ``PAGIdentitySanaLinearAttnProcessor2_0``
    (``to_out(to_v(x))``), bit for bit; mixed rows keep their own ``u``."""
    attn, x = attn1
    u = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    with torch.no_grad():
        plain = attn(x)
        identity = PAGIdentitySanaLinearAttnProcessor2_0()(attn, torch.cat([x, x]))[3:]
        out = perturbed_linear_attention(attn, (x,), {}, u)
    assert torch.equal(out[0], identity[0]) and torch.equal(out[2], identity[2]) and torch.equal(out[1], plain[1])
    assert effect(identity, plain) > MIN_EFFECT


def test_linear_attention_factored_matches_materialised_maps(attn1):
    """Per-(row, head) ``u``: ``(1 - u) (A V) + u V`` equals ``((1 - u) A + u I) V`` with ``A`` built explicitly
    (and row-stochastic)."""
    attn, x = attn1
    u = torch.tensor([[0.0, 0.3], [1.0, 0.5], [0.7, 0.0]])
    with torch.no_grad():
        factored = perturbed_linear_attention(attn, (x,), {}, u)
        materialised = perturbed_linear_attention(attn, (x,), {}, u, materialise=True)
        plain = attn(x)
    torch.testing.assert_close(factored, materialised, atol=2e-6, rtol=2e-5)
    assert effect(factored, plain) > MIN_EFFECT


@pytest.mark.parametrize("cfg", [4.5, 1.0], ids=["cfg", "no_cfg"])
def test_sana_matches_diffusers_pag_pipeline(sana_pipe, cfg):
    heads = f"{layer_index(sana_pipe, 'transformer_blocks.1.')}:*"
    check_matches_peer(sana_pipe, F.sana_inputs(batch=2, num_images_per_prompt=2, cfg=cfg), SanaPAGPipeline, heads,
                       rows=(4,), pag_applied_layers=["transformer_blocks.1"])


@pytest.mark.parametrize("cfg", [4.5, 1.0], ids=["cfg", "no_cfg"])
def test_sana_fused_eager_restore(sana_pipe, cfg):
    check_fused_eager_restore(sana_pipe, F.sana_inputs(batch=2, num_images_per_prompt=2, cfg=cfg), "0:1,1:0@0.5",
                              scale=3.0)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
def test_sana_fork_rows(sana_pipe, cfg):
    inputs = F.sana_inputs(batch=2, **({} if cfg else {"cfg": 1.0}))
    log, before, after = fork_rows(sana_pipe, inputs, "1:0", sana_pipe.transformer.transformer_blocks, cfg=cfg)
    assert log["block0"] == before
    assert log["block1"] == log["norm_out"] == after
