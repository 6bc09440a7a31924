"""FORA (arXiv 2407.01425): compute every ``interval`` steps, reuse all branch outputs in between."""
from __future__ import annotations

from dataclasses import dataclass

from .base import CacheConfig, CachePolicy, Mode, StepPlan, check_int, register_policy

__all__ = ["FORAConfig", "FORAPolicy"]


@dataclass(frozen=True)
class FORAConfig(CacheConfig):
    """interval (`int`, defaults to `3`): a FULL step every ``interval`` steps, REUSE steps in between.
    ``interval=1`` computes every step and equals the plain model."""

    interval: int = 3

    def __post_init__(self):
        super().__post_init__()
        check_int("FORAConfig", "interval", self.interval, 1)


@register_policy(FORAConfig)
class FORAPolicy(CachePolicy):
    def plan(self, step, num_steps=None):
        return StepPlan(Mode.FULL if step % self.config.interval == 0 else Mode.REUSE)

    def modes(self):
        return {Mode.FULL} if self.config.interval == 1 else {Mode.FULL, Mode.REUSE}
