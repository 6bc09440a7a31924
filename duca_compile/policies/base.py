"""What a caching policy decides: one ``StepPlan`` per denoising step, in plain Python.

Policies never run inside a traced graph; the runtime asks them for each call and picks the
matching pre-built variant, so switching modes costs no guard and no recompile.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Mode", "StepPlan", "CacheConfig", "CachePolicy", "register_policy", "make_policy", "POLICIES"]


class Mode(str, Enum):
    FULL = "full"        # compute every branch, write every cache
    REUSE = "reuse"      # read every branch output from its cache
    SKIP = "skip"        # skip the whole block stack (DuCa's aggressive step)
    SUBSET = "subset"    # cross-attention / FF on k tokens, self-attention reused (conservative step)


@dataclass(frozen=True)
class StepPlan:
    mode: Mode
    ratio: float = 0.0   # fraction of tokens computed per SUBSET site

    def actions(self, sites) -> tuple[dict, bool]:
        """Per-site actions ("compute" | "reuse" | k tokens) and whether the stack is skipped."""
        if self.mode is Mode.FULL:
            return {s.name: "compute" for s in sites}, False
        if self.mode is Mode.SUBSET:
            out = {}
            for s in sites:
                k = int(self.ratio * s.tokens[0]) if s.subsettable else 0
                out[s.name] = k if k > 0 else "reuse"
            return out, False
        return {s.name: "reuse" for s in sites}, self.mode is Mode.SKIP


@dataclass(frozen=True)
class CacheConfig:
    """Fields every method shares.

    seed (`int`, defaults to `0`): seeds token selection at the start of every request, so two
        requests with the same inputs give identical outputs.
    share_cfg_indices (`bool`, defaults to `True`): with an even batch, the second half (the other
        classifier-free-guidance branch) uses the first half's token indices, as the official code does.
    """

    seed: int = 0
    share_cfg_indices: bool = True

    def __post_init__(self):
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


class CachePolicy:
    """Maps a step index (0-based within a request) to a plan."""

    def __init__(self, config: CacheConfig):
        self.config = config

    def plan(self, step: int, num_steps: int | None = None) -> StepPlan:
        raise NotImplementedError

    def modes(self) -> set[Mode]:
        """Every mode this policy can ask for (used to describe it; variants still compile lazily)."""
        raise NotImplementedError


POLICIES: dict[type, type] = {}


def register_policy(config_type: type):
    def deco(policy_type: type) -> type:
        POLICIES[config_type] = policy_type
        return policy_type
    return deco


def make_policy(config: CacheConfig) -> CachePolicy:
    for config_type, policy_type in POLICIES.items():
        if type(config) is config_type:
            return policy_type(config)
    names = ", ".join(t.__name__ for t in POLICIES)
    raise ValueError(f"config must be one of {names}; got {type(config).__name__}")
