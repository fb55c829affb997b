"""The guided step: hooks, per-call state, attention routing, the fold, and the public enable / disable API."""

from .api import configure, disable, enable, enable_eager, enable_fused, fused, is_enabled, set_row_heads
from .settings import EXECUTIONS, Settings

__all__ = [
    "EXECUTIONS", "Settings", "configure", "disable", "enable", "enable_eager", "enable_fused", "fused", "is_enabled",
    "set_row_heads",
]
