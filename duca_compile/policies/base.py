"""What a caching policy decides: one ``StepPlan`` per denoising step, in plain Python.

Policies never run inside a traced graph; the runtime asks them for each call and picks the
matching pre-built variant, so switching modes costs no guard and no recompile. A plan is
turned into per-site actions ("compute" | "reuse" | k tokens) by ``CachePolicy.actions``; the
variant is keyed by those actions, so two steps with the same actions share one compiled graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

__all__ = ["Mode", "StepPlan", "CacheConfig", "CachePolicy", "register_policy", "make_policy", "POLICIES",
           "effective_mode", "check_int", "check_unit", "check_number", "check_bool"]


class Mode(str, Enum):
    FULL = "full"        # compute every branch, write every cache
    REUSE = "reuse"      # read (or forecast) every branch output from its cache
    SKIP = "skip"        # skip the whole block stack (DuCa's aggressive step)
    SUBSET = "subset"    # some sites compute k tokens; self-attention reused (conservative step)
    PARTIAL = "partial"  # per-site plan: some sites computed in full, the others reused


@dataclass(frozen=True)
class StepPlan:
    """mode: the step's kind; ratio: fraction of tokens for SUBSET sites (before any per-site
    schedule); site_modes: per site-kind overrides, e.g. ``(("cross_attn", Mode.REUSE),)``;
    full_blocks: the first n blocks compute in full whatever the mode (the official DiT schedule's
    steps that are full in layer 0 only). With SKIP they refresh their caches and the stack output
    is still read from its cache."""

    mode: Mode
    ratio: float = 0.0
    site_modes: tuple = ()
    full_blocks: int = 0


def check_int(owner: str, name: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        valid = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{owner}.{name} must be an int {valid}, got {value!r}")


def check_number(owner: str, name: str, value, low: float | None = None, high: float | None = None,
                 open_interval: bool = False) -> None:
    """A finite int or float (never a bool), within [low, high] (or (low, high) with ``open_interval``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_interval else value >= low
    if ok and high is not None:
        ok = value < high if open_interval else value <= high
    if not ok:
        lo, hi = ("(", ")") if open_interval else ("[", "]")
        valid = f"in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{owner}.{name} must be a finite number {valid}, got {value!r}")


def check_unit(owner: str, name: str, value) -> None:
    check_number(owner, name, value, 0.0, 1.0)


def check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class CacheConfig:
    """Fields every method shares.

    seed (`int`, defaults to `0`): seeds token selection at the start of every request, so two
        requests with the same inputs give identical outputs.
    share_cfg_indices (`bool`, defaults to `True`): with an even batch, the second half (the other
        classifier-free-guidance branch) uses the first half's token indices, as the official code does.
    compute_first (`int`, defaults to `0`): the first n blocks are computed at every step (a
        per-site plan, like cache-dit's "Fn" blocks); with n > 0 no step skips the whole stack.
    max_variants (`int`, defaults to `12`): warn when a model compiles more variants than this
        (each distinct pattern of per-site actions is one compiled graph; SUBSET sizes share one).
    """

    seed: int = 0
    share_cfg_indices: bool = True
    compute_first: int = 0
    max_variants: int = 12

    def __post_init__(self):
        owner = type(self).__name__
        check_int(owner, "seed", self.seed, -(2**63), 2**64 - 1)      # what torch.Generator takes
        check_bool(owner, "share_cfg_indices", self.share_cfg_indices)
        check_int(owner, "compute_first", self.compute_first, 0)
        check_int(owner, "max_variants", self.max_variants, 1)


def effective_mode(actions: dict, skip: bool) -> Mode:
    """The mode a set of per-site actions amounts to (what stats and explain report)."""
    if skip:
        return Mode.SKIP
    kinds = {a if isinstance(a, str) else "subset" for a in actions.values()}
    if kinds <= {"compute"}:
        return Mode.FULL
    if kinds == {"reuse"}:
        return Mode.REUSE
    return Mode.SUBSET if "subset" in kinds else Mode.PARTIAL


class CachePolicy:
    """Maps a step index (0-based within a request) to a plan, and a plan to per-site actions.

    Policies that also need run-time state say so through these class attributes, read by the
    runner: ``taylor_orders`` (finite differences kept per branch, 0 = plain reuse),
    ``taylor_warmup`` (no differences are taken at steps ``<= taylor_warmup − 2``: each starts afresh),
    ``propagation`` (ClusCa's gamma, None = no cluster propagation), ``subsets_parallel_blocks``
    (SUBSET steps run a parallel block's token-wise half on k tokens, ToCa-FLUX's single blocks),
    ``forecast_basis`` ((basis, scale) the Taylor terms are combined in: ``policies.forecasts``).
    """

    taylor_orders: int = 0
    forecast_basis: tuple = ("taylor", 1.0)
    subsets_parallel_blocks: bool = True
    taylor_warmup: int = 1
    propagation: float | None = None
    needs_num_steps: bool = False

    def __init__(self, config: CacheConfig):
        self.config = config

    def plan(self, step: int, num_steps: int | None = None) -> StepPlan:
        raise NotImplementedError

    def propagates(self, latent: bool) -> bool:
        """With ``propagation``: whether a SUBSET site on a stream that carries the latent directly
        (``latent``) or only through attention (a joint block's text stream) propagates."""
        return True

    def modes(self) -> set[Mode]:
        """Every step mode this policy can ask for."""
        raise NotImplementedError

    def require_num_steps(self, num_steps: int | None) -> int:
        if num_steps is None:
            raise ValueError(
                f"{type(self.config).__name__} needs the number of denoising steps: use "
                "duca_compile.enable(pipe, config) for a diffusers pipeline, or wrap the loop in "
                "`with duca_compile.sampling(model, num_steps=N):`")
        return num_steps

    def site_k(self, site, layers: int, plan: StepPlan, step: int, num_steps: int | None) -> int:
        """Tokens computed at ``site`` on a SUBSET step (0 = reuse it): a positive ratio computes some."""
        return max(int(plan.ratio * site.tokens[0]), 1) if plan.ratio > 0 else 0

    def actions(self, plan: StepPlan, sites, layers: int, step: int, num_steps: int | None) -> tuple[dict, bool]:
        """Per-site actions ("compute" | "reuse" | k tokens) and whether the whole stack is skipped
        (its output read from the cache; sites of ``plan.full_blocks`` still compute, for their caches)."""
        overrides = dict(plan.site_modes)
        out, computes = {}, False          # computes: a computed site feeds the stack (no SKIP then)
        for site in sites:
            if site.layer < self.config.compute_first:
                mode, feeds = Mode.FULL, True
            elif site.layer < plan.full_blocks:        # on a SKIP step these only refresh their caches
                mode, feeds = Mode.FULL, plan.mode is not Mode.SKIP
            else:
                mode, feeds = overrides.get(site.kind, plan.mode), True
            if mode is Mode.FULL:
                out[site.name] = "compute"
                computes = computes or feeds
            elif mode is Mode.SUBSET and site.subsettable:
                # One compiled SUBSET serves every k >= 2 (sizes 0 and 1 are specialised), so a site
                # with a positive ratio whose k rounds below 2 computes 2: the step keeps its one
                # pattern, a little fresher.
                k = self.site_k(site, layers, plan, step, num_steps)
                out[site.name] = min(max(k, MIN_SUBSET), site.tokens[0]) if k > 0 else "reuse"
            else:
                out[site.name] = "reuse"
        # a SKIP step whose full blocks are every block (a one-block model) is a FULL step
        skip = (plan.mode is Mode.SKIP and not computes and not any(isinstance(a, int) for a in out.values())
                and "reuse" in out.values())
        return out, skip


MIN_SUBSET = 2      # the fewest tokens a SUBSET step computes at a site

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
