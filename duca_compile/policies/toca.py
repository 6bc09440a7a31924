"""ToCa (arXiv 2410.05317): full steps, then conservative steps that recompute the top-R tokens.

Every non-full step is conservative: self-attention is reused, cross-attention and feed-forward
recompute ``R_eff`` of their tokens, chosen by score (random or kv-norm, plus the staleness and
spatial terms). The attention-map scores s1/s2 are not offered: fused attention never forms the map.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import CachePolicy, Mode, StepPlan, register_policy
from .schedules import TokenConfig

__all__ = ["ToCaConfig", "ToCaPolicy"]


@dataclass(frozen=True)
class ToCaConfig(TokenConfig):
    """Token-wise caching; every field is a ``TokenConfig`` field (interval, ratio, selection, scores,
    ratio and interval schedules)."""


@register_policy(ToCaConfig)
class ToCaPolicy(CachePolicy):
    def __init__(self, config):
        super().__init__(config)
        self.needs_num_steps = config.needs_num_steps

    def plan(self, step, num_steps=None):
        if self.needs_num_steps:
            self.require_num_steps(num_steps)
        if step < self.config.warmup:
            return StepPlan(Mode.FULL)
        head, rest = self.config.residues(step, num_steps)
        if rest == 0:
            return StepPlan(Mode.FULL)
        return StepPlan(Mode.SUBSET, self.config.ratio, full_blocks=1 if head == 0 else 0)

    def site_k(self, site, layers, plan, step, num_steps):
        return self.config.site_k(site, layers, plan, step, num_steps)

    def modes(self):
        return {Mode.FULL, Mode.SUBSET}
