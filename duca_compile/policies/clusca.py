"""ClusCa (arXiv 2509.10312): cluster tokens at full steps, compute one token per cluster in between.

At FULL steps the runtime clusters the tokens of the hidden state (k-means, L1 distance,
warm-started from the previous centroids). At other steps each feed-forward branch computes one
random representative per cluster and propagates it, ``F_i ← γ·F_rep(c) + (1−γ)·F_i`` for every
token i of cluster c, into the order-0 TaylorSeer term; attention branches are TaylorSeer forecasts.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import CacheConfig, CachePolicy, Mode, StepPlan, check_bool, check_int, check_unit, register_policy
from .forecasts import check_basis
from .taylorseer import counter_full_step

__all__ = ["ClusCaConfig", "ClusCaPolicy"]


@dataclass(frozen=True)
class ClusCaConfig(CacheConfig):
    """interval (`int`, defaults to `5`): N, a FULL step every N steps after the warm-up.
    clusters (`int`, defaults to `16`): K, clusters and so tokens computed per feed-forward site.
    propagation (`float`, defaults to `0.005`): γ, weight of the representative in its cluster's update.
    max_order (`int`, defaults to `1`): TaylorSeer order of every branch.
    first_enhance (`int`, defaults to `3`): warm-up FULL steps.
    kmeans_iters (`int`, defaults to `10`): k-means iterations per full step, warm-started from
        the last centroids (run without an early-stop test, which would sync the host; a converged
        clustering is a fixed point).
    kmeans_cold_iters (`int`, defaults to `10`): iterations of a request's first clustering, from
        random tokens (official: up to 100 on DiT, 10 on FLUX, stopping once the centroids settle).
    propagate_text (`bool`, defaults to `True`): also propagate on streams that see the latent only
        through attention (joint attention's text stream); official FLUX ClusCa does not (False):
        its text representatives are scattered plainly.
    forecast (`str`, defaults to `"taylor"`), hermite_scale (`float`, defaults to `0.5`): the basis of
        the TaylorSeer forecasts, as ``TaylorSeerConfig``'s ("hermite": HiCache, which reports
        it on top of ClusCa too)."""

    interval: int = 5
    clusters: int = 16
    propagation: float = 0.005
    max_order: int = 1
    first_enhance: int = 3
    kmeans_iters: int = 10
    kmeans_cold_iters: int = 10
    propagate_text: bool = True
    forecast: str = "taylor"
    hermite_scale: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_int(owner, "interval", self.interval, 1)
        check_int(owner, "clusters", self.clusters, 1)
        check_unit(owner, "propagation", self.propagation)
        check_int(owner, "max_order", self.max_order, 0)
        check_int(owner, "first_enhance", self.first_enhance, 1)
        check_int(owner, "kmeans_iters", self.kmeans_iters, 1)
        check_int(owner, "kmeans_cold_iters", self.kmeans_cold_iters, 1)
        check_bool(owner, "propagate_text", self.propagate_text)
        # FoCa's recursion starts from the last full value, which ClusCa's SUBSET steps rewrite
        check_basis(owner, self.forecast, self.hermite_scale, ("taylor", "hermite"))


@register_policy(ClusCaConfig)
class ClusCaPolicy(CachePolicy):
    subsets_parallel_blocks = False     # official FLUX: single-stream blocks are pure Taylor forecasts

    def __init__(self, config):
        super().__init__(config)
        self.taylor_orders, self.taylor_warmup = config.max_order, config.first_enhance
        self.propagation = float(config.propagation)
        self.forecast_basis = (config.forecast, config.hermite_scale)

    def propagates(self, latent: bool) -> bool:
        return latent or self.config.propagate_text

    def plan(self, step, num_steps=None):
        c = self.config
        if counter_full_step(step, c.interval, c.first_enhance):
            return StepPlan(Mode.FULL)
        return StepPlan(Mode.SUBSET, 0.0, (("self_attn", Mode.REUSE), ("cross_attn", Mode.REUSE)))

    def site_k(self, site, layers, plan, step, num_steps):
        if self.config.clusters > site.tokens[0]:
            raise ValueError(f"ClusCaConfig.clusters={self.config.clusters} is more than the "
                             f"{site.tokens[0]} tokens of {site.name}")
        return self.config.clusters

    def modes(self):
        return {Mode.FULL} if self.config.interval == 1 else {Mode.FULL, Mode.SUBSET}
