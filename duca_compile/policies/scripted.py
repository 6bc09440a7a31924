"""A fixed, user-written schedule: one mode per step (cycled), e.g. for ablations and tests."""
from __future__ import annotations

from dataclasses import dataclass

from .base import CacheConfig, CachePolicy, Mode, StepPlan, check_unit, register_policy

__all__ = ["ScriptedConfig", "ScriptedPolicy"]


@dataclass(frozen=True)
class ScriptedConfig(CacheConfig):
    """modes (`tuple[str, ...]`): the mode of step i is ``modes[i % len(modes)]``, each one of
        "full", "reuse", "skip", "subset". The first step of a request always runs FULL.
    ratio (`float`, defaults to `0.3`): fraction of tokens computed per site on "subset" steps."""

    modes: tuple = ("full",)
    ratio: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        valid = tuple(m.value for m in Mode)
        if not isinstance(self.modes, (tuple, list)) or not self.modes or \
                any(not isinstance(m, str) or m not in valid for m in self.modes):
            raise ValueError(f"ScriptedConfig.modes must be a non-empty tuple of {valid}, got {self.modes!r}")
        check_unit("ScriptedConfig", "ratio", self.ratio)
        object.__setattr__(self, "modes", tuple(self.modes))


@register_policy(ScriptedConfig)
class ScriptedPolicy(CachePolicy):
    def plan(self, step, num_steps=None):
        mode = Mode(self.config.modes[step % len(self.config.modes)])
        return StepPlan(mode, self.config.ratio if mode is Mode.SUBSET else 0.0)

    def modes(self):
        return {Mode(m) for m in self.config.modes} | {Mode.FULL}
