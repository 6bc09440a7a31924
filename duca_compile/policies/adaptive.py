"""Adaptive caching (FBCache / DBCache): each step decides from the data whether to compute the
blocks past the head, by how much the head's residual changed since the last computed step.

The step's first ``head_blocks`` blocks always run. Their residual ``r`` (the latent stream leaving
block ``head_blocks − 1`` minus the stream entering block 0) is compared with ``p``, the residual of
the last computed step: ``diff = mean|r − p| / mean|p|``. A step computes the remaining blocks when
``diff > threshold`` (or a limit forces it); otherwise the stream leaving the middle blocks is the
head's output plus the middle blocks' residual cached at the last computed step, and the last
``tail_blocks`` blocks run on that. ``p`` is updated on computed steps only (diffusers'
``FirstBlockCache``, cache-dit's DBCache). The decision is taken on the host from the two means
the compiled head returns: one device-to-host read per step where the threshold decides, none in
warm-up or where a limit decides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .base import CacheConfig, CachePolicy, Mode, check_int, check_number, register_policy
from .forecasts import FOCA_TERMS, FoCa, check_basis, coefficient

__all__ = ["AdaptiveConfig", "AdaptivePolicy", "decide", "record", "Counters", "Forecast", "forecast_basis",
           "forecast_terms"]

FORECASTS = ("reuse", "taylorseer", "hermite", "foca")


@dataclass(frozen=True)
class AdaptiveConfig(CacheConfig):
    """head_blocks (`int`, defaults to `1`): Fn, blocks computed at every step; the decision reads
        their residual. ``1`` is First Block Cache.
    tail_blocks (`int`, defaults to `0`): Bn, last blocks computed at every step, on the cached stream.
    threshold (`float`, defaults to `0.05`): a step computes the middle blocks when the head
        residual's relative L1 change since the last computed step is above it (diffusers'
        ``FirstBlockCacheConfig`` default; cache-dit's DBCache uses 0.08). Higher: faster, further
        from the uncached model.
    warmup (`int`, defaults to `0`): the first n steps of a request always compute (step 0 always does).
    max_cached_steps (`int`, optional): at most this many cached steps per request (and per cache
        slot, e.g. per CFG branch run as a separate call); then every step computes.
    max_consecutive_cached (`int`, optional): a step after this many cached steps in a row computes.
    warmup_interval (`int`, defaults to `1`): with ``warmup``, only steps ``0, i, 2i, ... < warmup``
        are forced to compute; the other warm-up steps decide as usual (cache-dit's ``warmup_interval``).
    max_accumulated_diff (`float`, optional): once the diffs read so far in the request (on cached
        and computed steps) add up to it, every later step computes (cache-dit's
        ``max_accumulated_residual_diff_threshold``: a budget for the whole request, never reset).
    forecast (`str`, defaults to `"reuse"`): what a cached step adds to the head's output: the
        middle residual of the last computed step ("reuse"), or its TaylorSeer forecast from the
        last computed steps ("taylorseer", cache-dit's DBCache + TaylorSeer calibrator), or the same
        differences in HiCache's Hermite basis ("hermite", ``policies.forecasts``), or FoCa's
        predictor-corrector ("foca": cache-dit's DBCache + FoCa calibrator).
    forecast_order (`int`, defaults to `1`): the forecast's highest finite difference, 1 or 2
        (not used by "foca", which keeps its own two terms).
    hermite_scale (`float`, defaults to `0.5`): HiCache's σ, with ``forecast="hermite"``.
    target (`float`, optional): compute this fraction of each request's steps instead of tuning
        ``threshold`` (which must then stay at its default). Each step's diff is compared with the
        quantile of the request's diffs so far that leaves the remaining budget for the remaining
        steps; the budget itself is kept: a step computes when the budget needs every remaining
        step, and is cached once it is spent. Needs the request's length (``enable(pipe)`` or
        ``sampling(model, num_steps=N)``). Warm-up steps count towards the budget.
    """

    head_blocks: int = 1
    tail_blocks: int = 0
    threshold: float = 0.05
    warmup: int = 0
    max_cached_steps: int | None = None
    max_consecutive_cached: int | None = None
    warmup_interval: int = 1
    max_accumulated_diff: float | None = None
    forecast: str = "reuse"
    forecast_order: int = 1
    target: float | None = None
    hermite_scale: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_int(owner, "head_blocks", self.head_blocks, 1)
        check_int(owner, "tail_blocks", self.tail_blocks, 0)
        check_number(owner, "threshold", self.threshold, 0.0)
        check_int(owner, "warmup", self.warmup, 0)
        if self.max_cached_steps is not None:
            check_int(owner, "max_cached_steps", self.max_cached_steps, 0)
        if self.max_consecutive_cached is not None:
            check_int(owner, "max_consecutive_cached", self.max_consecutive_cached, 1)
        check_int(owner, "warmup_interval", self.warmup_interval, 1)
        if self.max_accumulated_diff is not None:
            check_number(owner, "max_accumulated_diff", self.max_accumulated_diff, 0.0, open_interval=True)
        check_basis(owner, self.forecast, self.hermite_scale, FORECASTS)
        check_int(owner, "forecast_order", self.forecast_order, 1, 2)
        if self.target is not None:
            check_number(owner, "target", self.target, 0.0, 1.0)
            if self.target == 0.0 or self.threshold != AdaptiveConfig.threshold:
                raise ValueError(f"{owner}.target must be in (0, 1] and replaces threshold: set one of them, got "
                                 f"target={self.target!r}, threshold={self.threshold!r}")
        if self.compute_first:
            raise ValueError(f"{owner}.compute_first must be 0: the blocks computed at every step are "
                             f"head_blocks (got compute_first={self.compute_first})")


@dataclass
class Counters:
    """What one cache slot's decisions depend on, within one request."""

    cached: int = 0              # cached steps so far
    computed: int = 0            # computed steps so far
    consecutive: int = 0         # cached steps since the last computed one
    accumulated: float = 0.0     # the positive diffs read so far
    diffs: list = field(default_factory=list)     # with ``target``: the diffs read so far


def decide(config: AdaptiveConfig, step: int, fresh: bool, counters: Counters, read_diff,
           num_steps: int | None = None) -> tuple[bool, float | None]:
    """(compute the middle blocks?, the diff read or None). ``fresh``: no computed step of this
    request to compare with; ``read_diff()``: the head's diff as a float (the one host read),
    called only when the threshold decides. Limits are checked first, in cache-dit's order."""
    c = config
    if c.target is not None and num_steps is None:
        raise ValueError("AdaptiveConfig(target=...) needs the number of denoising steps: use "
                         "duca_compile.enable(pipe, config) for a diffusers pipeline, or wrap the loop in "
                         "`with duca_compile.sampling(model, num_steps=N):`")
    if fresh or (step < c.warmup and step % c.warmup_interval == 0):
        return True, None
    if c.max_cached_steps is not None and counters.cached >= c.max_cached_steps:
        return True, None
    if c.max_consecutive_cached is not None and counters.consecutive >= c.max_consecutive_cached:
        return True, None
    if c.max_accumulated_diff is not None and counters.accumulated >= c.max_accumulated_diff:
        return True, None
    if c.target is None:
        diff = read_diff()
        return diff > c.threshold, diff
    budget, remaining = round(c.target * num_steps) - counters.computed, num_steps - step
    if budget >= remaining or budget <= 0:
        return budget > 0, None
    diff = read_diff()
    counters.diffs.append(diff)
    return diff >= quantile(counters.diffs, 1 - budget / remaining), diff


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``, interpolated linearly between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def record(counters: Counters, compute: bool, diff: float | None) -> None:
    if diff is not None and diff > 0:
        counters.accumulated += diff
    if compute:
        counters.consecutive = 0
        counters.computed += 1
    else:
        counters.cached += 1
        counters.consecutive += 1


class Forecast:
    """TaylorSeer on the middle residual, as cache-dit's calibrator: computed steps are anchors
    (``Δ⁰ = Y``, ``Δ^{i+1} = (Δ^i − Δ^i_prev) / d``, d the steps between the two anchors, taken
    only where the previous anchor had ``Δ^i`` and from step 3 on: the calibrator counts one step
    behind); a cached step ``k`` steps after the last anchor adds ``Σ Δ^i k^i / i!``."""

    def __init__(self, order: int, basis: tuple = ("taylor", 1.0)):
        self.order, self.basis = order, basis
        self.last: int | None = None
        self.valid = [False] * (order + 1)      # which Δ^i the last anchor holds
        self.foca = FoCa() if basis[0] == "foca" else None

    def weights(self, step: int) -> list[float]:
        """COMPUTE at ``step``: each difference's weight (0: not taken); moves the anchor."""
        if self.foca is not None:
            self.last = step
            return self.foca.computed(step)
        w, valid = [0.0] * self.order, [True] + [False] * self.order
        for i in range(self.order):
            if not (self.valid[i] and step >= 3):
                break
            w[i], valid[i + 1] = 1.0 / (step - self.last), True
        self.last, self.valid = step, valid
        return w

    def coefficients(self, step: int) -> list[float]:
        """REUSE at ``step``: each term's coefficient (0 for a difference the anchor lacks)."""
        if self.foca is not None:
            return self.foca.cached(step)
        k = step - self.last
        return [coefficient(self.basis, k, i) if ok else 0.0 for i, ok in enumerate(self.valid)]


@register_policy(AdaptiveConfig)
class AdaptivePolicy(CachePolicy):
    """Decisions are taken per call from the data (``decide``), not per step index: there is no plan."""

    def plan(self, step, num_steps=None):
        raise ValueError("AdaptiveConfig decides each step from the data at run time; it has no fixed plan")

    def modes(self):
        return {Mode.FULL, Mode.SKIP}


def forecast_basis(config: AdaptiveConfig) -> tuple:
    if config.forecast in ("hermite", "foca"):
        return config.forecast, config.hermite_scale
    return "taylor", 1.0


def forecast_terms(config: AdaptiveConfig) -> int:
    """Terms kept beside the middle residual: 0 with "reuse", FoCa's two, else ``forecast_order``."""
    return {"reuse": 0, "foca": FOCA_TERMS}.get(config.forecast, config.forecast_order)
