"""DuCa (arXiv 2412.18911): full steps, then conservative and aggressive steps alternating.

A step's residue ``r`` within its cycle decides: 0 FULL, odd a conservative SUBSET step
(self-attention reused, cross-attention and FF recompute ``R_eff`` of their tokens), even an
aggressive SKIP step (the whole stack reused). Counting up with a constant interval this is the
official PixArt schedule, F C A F C A …; ``count_down`` + ``interval_weight`` + ``forced_interval``
give the DiT one (interval recomputed at each full step); ``cycles`` gives OpenSora's per-module
cycles. v1 (V-caching) is ``selection="kv-norm"``, v2 is ``selection="random"``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import CachePolicy, Mode, StepPlan, register_policy
from .schedules import TokenConfig

__all__ = ["DuCaConfig", "DuCaPolicy"]

_LETTERS = {"F": Mode.FULL, "C": Mode.SUBSET, "A": Mode.SKIP}
_KINDS = ("self_attn", "cross_attn", "ff")


@dataclass(frozen=True)
class DuCaConfig(TokenConfig):
    """Every ``TokenConfig`` field, plus:

    cycles (`tuple`, defaults to `()`): per-module cycles instead of the interval schedule,
        ``(("self_attn", "FCA"), ("ff", "FCA"), ("cross_attn", "FCACCA"))``: site kind -> letters
        F (full), C (conservative), A (aggressive) indexed by ``step % len``. A step where every
        kind is A skips the whole stack.
    """

    cycles: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        cycles = _cycles(self.cycles)
        if cycles and {c[0] for c in cycles} != set(_KINDS):
            raise ValueError(f"DuCaConfig.cycles must give a cycle for every kind {_KINDS}, got {self.cycles!r}")
        object.__setattr__(self, "cycles", cycles)


def _cycles(value) -> tuple:
    """``value`` as ((kind, letters), ...), or ValueError."""
    raw = tuple(value.items()) if isinstance(value, dict) else value
    ok = isinstance(raw, (tuple, list)) and all(
        isinstance(c, (tuple, list)) and len(c) == 2 and isinstance(c[0], str) and c[0] in _KINDS
        and isinstance(c[1], str) and c[1] and not set(c[1]) - set(_LETTERS) for c in raw)
    if not ok:
        raise ValueError(f"DuCaConfig.cycles must be ((kind, letters), ...) with kind in {_KINDS} and "
                         f"letters from 'FCA', got {value!r}")
    return tuple(tuple(c) for c in raw)


@register_policy(DuCaConfig)
class DuCaPolicy(CachePolicy):
    def __init__(self, config):
        super().__init__(config)
        self.needs_num_steps = config.needs_num_steps and not config.cycles

    def plan(self, step, num_steps=None):
        c = self.config
        if step < c.warmup:
            return StepPlan(Mode.FULL)
        if c.cycles:
            kinds = {kind: _LETTERS[letters[step % len(letters)]] for kind, letters in c.cycles}
            modes = set(kinds.values())
            if modes == {Mode.SKIP}:
                return StepPlan(Mode.SKIP)
            main = Mode.FULL if Mode.FULL in modes else Mode.SUBSET
            site_modes = tuple((k, Mode.REUSE if m is Mode.SKIP else m) for k, m in kinds.items() if m is not main)
            return StepPlan(main, c.ratio, site_modes)
        if self.needs_num_steps:
            self.require_num_steps(num_steps)
        head, rest = c.residues(step, num_steps)
        if rest == 0:
            return StepPlan(Mode.FULL)
        full_blocks = 1 if head == 0 else 0       # "per-layer": full in block 0 only
        if rest % 2:
            return StepPlan(Mode.SUBSET, c.ratio, full_blocks=full_blocks)
        return StepPlan(Mode.SKIP, full_blocks=full_blocks)

    def site_k(self, site, layers, plan, step, num_steps):
        return self.config.site_k(site, layers, plan, step, num_steps)

    def modes(self):
        if self.config.cycles:
            return {Mode.FULL, Mode.SUBSET, Mode.SKIP, Mode.PARTIAL}
        n = self.config.interval
        dynamic = self.config.interval_weight or self.config.forced_interval
        return {Mode.FULL} | ({Mode.SUBSET} if n > 1 or dynamic else set()) | ({Mode.SKIP} if n > 2 or dynamic else set())
