"""DuCa (arXiv 2412.18911): full steps, then conservative and aggressive steps alternating.

With the step counting up from the last full step (residue ``r = step % interval``): ``r == 0`` is
FULL, odd ``r`` a conservative SUBSET step (self-attention reused, cross-attention and FF recomputed
for ``ratio`` of the tokens), even ``r`` an aggressive SKIP step (the whole stack reused). This is
the official PixArt schedule: F C A F C A … for ``interval=3``, F C A C A … for 5.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import CacheConfig, CachePolicy, Mode, StepPlan, register_policy

__all__ = ["DuCaConfig", "DuCaPolicy"]

SELECTIONS = ("random",)


@dataclass(frozen=True)
class DuCaConfig(CacheConfig):
    """interval (`int`, defaults to `3`): steps per cycle, the first of which is FULL.
    ratio (`float`, defaults to `0.3`): fraction of tokens recomputed per site on conservative steps.
    selection (`str`, defaults to `"random"`): how tokens are chosen; DuCa v2 found random selection
        as good as or better than importance scores."""

    interval: int = 3
    ratio: float = 0.3
    selection: str = "random"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"DuCaConfig.interval must be an int >= 1, got {self.interval!r}")
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"DuCaConfig.ratio must be in [0, 1], got {self.ratio!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"DuCaConfig.selection must be one of {SELECTIONS}, got {self.selection!r}")


@register_policy(DuCaConfig)
class DuCaPolicy(CachePolicy):
    def plan(self, step, num_steps=None):
        r = step % self.config.interval
        if r == 0:
            return StepPlan(Mode.FULL)
        if r % 2 == 1:
            return StepPlan(Mode.SUBSET, self.config.ratio)
        return StepPlan(Mode.SKIP)

    def modes(self):
        n = self.config.interval
        return {Mode.FULL} | ({Mode.SUBSET} if n > 1 else set()) | ({Mode.SKIP} if n > 2 else set())
