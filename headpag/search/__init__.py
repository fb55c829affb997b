"""Head search: HeadHunter, objectives, the run directory's format, and pictures of a run."""

from .hunter import STRATEGIES, HuntResult, RoundResult, hunt

__all__ = ["HuntResult", "RoundResult", "STRATEGIES", "hunt"]
