"""diffusers' cache hooks are refused by name: when enabling headpag on a cached denoiser, and at the first guided
call when a cache is enabled after headpag (fused and eager alike); the pipeline runs cached again once headpag
is disabled, and guided again once the cache is disabled. Every cache diffusers 0.42 ships, on the tiny Flux."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, SeaCacheConfig,
    TaylorSeerCacheConfig, TextKVCacheConfig, apply_first_block_cache, apply_pyramid_attention_broadcast,
)

import headpag
from headpag.guided.caches import CACHE_HOOKS, active_caches
from support import models as M
from support.checks import ENABLE, effect, guided, patched
from support.tolerances import MIN_EFFECT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = {
    "FasterCacheConfig": lambda pipe: FasterCacheConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: pipe.current_timestep,
        is_guidance_distilled=True),
    "FirstBlockCacheConfig": lambda pipe: FirstBlockCacheConfig(threshold=0.2),
    "MagCacheConfig": lambda pipe: MagCacheConfig(num_inference_steps=3, mag_ratios=[1.0] * 3),
    "PyramidAttentionBroadcastConfig": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: pipe.current_timestep),
    "SeaCacheConfig": lambda pipe: SeaCacheConfig(),
    "TaylorSeerCacheConfig": lambda pipe: TaylorSeerCacheConfig(),
    "TextKVCacheConfig": lambda pipe: TextKVCacheConfig(),
}


@pytest.fixture(scope="module")
def flux_pipe():
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # FasterCache / SeaCache warn on every enable
    return M.flux()


def test_every_cache_diffusers_ships_is_covered():
    assert sorted(CONFIGS) == sorted(CACHE_HOOKS.values())


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("execution", list(ENABLE))
def test_a_cache_is_refused_by_name(flux_pipe, name, execution):
    pipe, inputs = flux_pipe, M.flux_inputs()
    plain = M.run(pipe, inputs)
    match = f"FluxTransformer2DModel has diffusers cache {name} enabled"
    pipe.transformer.enable_cache(CONFIGS[name](pipe))
    try:
        assert active_caches(pipe.transformer) == [name]
        cached = M.run(pipe, inputs)
        with pytest.raises(ValueError, match=match):  # a cache, then headpag
            ENABLE[execution](pipe, "1:0")
        assert not headpag.is_enabled(pipe)
        assert torch.equal(M.run(pipe, inputs), cached)
    finally:
        pipe.transformer.disable_cache()
    with patched(pipe, execution, "1:0", scale=3.0):  # headpag, then a cache
        pipe.transformer.enable_cache(CONFIGS[name](pipe))
        try:
            with pytest.raises(ValueError, match=match):
                M.run(pipe, inputs)
        finally:
            pipe.transformer.disable_cache()
        assert effect(M.run(pipe, inputs), plain) > MIN_EFFECT  # guided again without the cache
    assert torch.equal(M.run(pipe, inputs), plain)


def test_cache_hooks_applied_without_enable_cache_are_found(flux_pipe):
    """apply_first_block_cache registers its hooks on the blocks without setting the model's cache config."""
    pipe, inputs = flux_pipe, M.flux_inputs()
    with patched(pipe, "fused", "1:0", scale=3.0):
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.2))
        try:
            assert pipe.transformer._cache_config is None
            with pytest.raises(ValueError, match="diffusers cache FirstBlockCacheConfig enabled"):
                M.run(pipe, inputs)
        finally:
            pipe.transformer._cache_config = FirstBlockCacheConfig(threshold=0.2)
            pipe.transformer.disable_cache()
    assert active_caches(pipe.transformer) == []
    guided(pipe, "fused", "1:0", inputs)


def test_attention_level_cache_hooks_on_unselected_layers_are_found(flux_pipe):
    """apply_pyramid_attention_broadcast hooks attention modules (not blocks), here also layers without selected
    heads, after headpag was enabled: the guided call still refuses it."""
    pipe, inputs = flux_pipe, M.flux_inputs()
    with patched(pipe, "eager", "0:0", scale=3.0):
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: pipe.current_timestep,
            spatial_attention_block_identifiers=("single_transformer_blocks",))  # not layer 0's block
        apply_pyramid_attention_broadcast(pipe.transformer, config)
        try:
            assert pipe.transformer._cache_config is None
            with pytest.raises(ValueError, match="diffusers cache PyramidAttentionBroadcastConfig enabled"):
                M.run(pipe, inputs)
        finally:
            pipe.transformer._cache_config = CONFIGS["PyramidAttentionBroadcastConfig"](pipe)
            pipe.transformer.disable_cache()
    assert active_caches(pipe.transformer) == []
