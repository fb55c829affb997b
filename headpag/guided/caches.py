"""diffusers' cache hooks and a guided session: refused, by name, before they can reuse the wrong rows.

Every cache diffusers 0.42 ships keeps per-module state across denoiser calls (block residuals, attention outputs,
Taylor factors, text K/V) for the batch as it saw it, and decides to skip work for the whole batch at once. A
guided call changes the batch (twin rows appear at the fork, guided and unguided steps differ in rows, an eager
step runs a second forward), so a twin row would reuse state cached from other rows or steps: the result would be
neither the cached pipeline's nor headpag's. headpag therefore refuses a denoiser with a cache, when enabling and at
every guided call (a cache enabled after headpag), naming the cache and how to turn it off.
"""

from __future__ import annotations

from torch import nn

#: diffusers' cache hook modules (``diffusers.hooks.<module>``) -> the cache's name (its config class).
CACHE_HOOKS = {
    "faster_cache": "FasterCacheConfig",
    "first_block_cache": "FirstBlockCacheConfig",
    "mag_cache": "MagCacheConfig",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcastConfig",
    "sea_cache": "SeaCacheConfig",
    "taylorseer_cache": "TaylorSeerCacheConfig",
    "text_kv_cache": "TextKVCacheConfig",
}


def active_caches(denoiser: nn.Module) -> list[str]:
    """The caches on ``denoiser``: its ``enable_cache`` config and any cache hook registered on it or on any of its
    modules (diffusers registers cache hooks on blocks and attention modules)."""
    found = set()
    config = getattr(denoiser, "_cache_config", None)
    if config is not None:
        found.add(type(config).__name__)
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            name = CACHE_HOOKS.get(type(hook).__module__.rsplit(".", 1)[-1])
            if name is not None:
                found.add(name)
    return sorted(found)


def check_no_cache(denoiser: nn.Module) -> None:
    """Raises ``ValueError`` naming the caches of :func:`active_caches`, if any."""
    caches = active_caches(denoiser)
    if caches:
        raise ValueError(
            f"{type(denoiser).__name__} has diffusers cache {', '.join(caches)} enabled: a cache reuses state across "
            f"denoiser calls for the batch as it saw it, and headpag's guided calls change the batch (twin rows from "
            f"the fork on, a separate perturbed forward in eager), so cached state would reach the wrong rows; "
            f"call denoiser.disable_cache() (or remove the hooks) before guiding, or disable headpag"
        )
