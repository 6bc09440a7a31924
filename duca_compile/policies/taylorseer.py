"""TaylorSeer (arXiv 2503.06923): forecast branch outputs from finite differences of past full steps.

At each FULL step every branch keeps ``Δ⁰ = F`` and ``Δ^{i+1} = (Δ^i_new − Δ^i_old) / d`` (d: steps
between the last two full steps), up to ``max_order`` and only as far as history allows. Other
steps are REUSE steps whose compiled variant outputs ``Σ_i Δ^i · k^i / i!`` (k: steps since the
last full step) in place of each branch. Order 0 is FORA.

``phase="diffusers"`` places the full steps as diffusers' ``TaylorSeerCache`` does (with
``first_enhance`` as its ``disable_cache_before_step``, ``interval`` as ``cache_interval``,
``max_order`` as ``max_order``) and takes differences from the second step on, as it does: the
same outputs, for users switching from it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import CacheConfig, CachePolicy, Mode, StepPlan, check_int, register_policy
from .forecasts import FOCA_TERMS, check_basis

__all__ = ["TaylorSeerConfig", "TaylorSeerPolicy", "counter_full_step"]


PHASES = ("official", "diffusers")


def counter_full_step(step: int, interval: int, first_enhance: int, phase: str = "official") -> bool:
    """The official counter schedule: ``first_enhance`` warm-up full steps, then one every ``interval``
    counted from the last warm-up step; diffusers' counts from the step after the first cached one."""
    if phase == "diffusers":
        return step < first_enhance or (step - first_enhance - 1) % interval == 0
    return step < first_enhance or (step - (first_enhance - 1)) % interval == 0


@dataclass(frozen=True)
class TaylorSeerConfig(CacheConfig):
    """interval (`int`, defaults to `4`): N, a FULL step every N steps after the warm-up.
    max_order (`int`, defaults to `2`): highest finite difference kept (0 = FORA).
    first_enhance (`int`, defaults to `2`): warm-up FULL steps at the start of a request; no
        differences are taken at steps ``<= first_enhance − 2``, as in the official code.
    phase (`str`, defaults to `"official"`): where the FULL steps after the warm-up fall:
        "official" ``(step − (first_enhance − 1)) % interval == 0`` (the TaylorSeer code), or
        "diffusers" ``(step − first_enhance − 1) % interval == 0`` with differences from step 1 on
        (diffusers' ``TaylorSeerCache``: its outputs, for the same settings).
    forecast (`str`, defaults to `"taylor"`): how cached steps are forecast: "taylor" (``k^i / i!``
        on the differences), "hermite" (HiCache: ``σ^i H_i(σk) / i!``), or "foca" (FoCa's
        predictor-corrector as cache-dit implements it; its own two terms, ``max_order`` unused).
        See ``policies.forecasts``.
    hermite_scale (`float`, defaults to `0.5`): HiCache's σ (its FLUX default), with "hermite"."""

    interval: int = 4
    max_order: int = 2
    first_enhance: int = 2
    phase: str = "official"
    forecast: str = "taylor"
    hermite_scale: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_int(owner, "interval", self.interval, 1)
        check_int(owner, "max_order", self.max_order, 0)
        check_int(owner, "first_enhance", self.first_enhance, 1)
        if not isinstance(self.phase, str) or self.phase not in PHASES:
            raise ValueError(f"{owner}.phase must be one of {PHASES}, got {self.phase!r}")
        check_basis(owner, self.forecast, self.hermite_scale)


@register_policy(TaylorSeerConfig)
class TaylorSeerPolicy(CachePolicy):
    def __init__(self, config):
        super().__init__(config)
        self.taylor_orders = FOCA_TERMS if config.forecast == "foca" else config.max_order
        # diffusers differences every update after the first; the official code starts afresh in the warm-up
        self.taylor_warmup = 1 if config.phase == "diffusers" else config.first_enhance
        self.forecast_basis = (config.forecast, config.hermite_scale)

    def plan(self, step, num_steps=None):
        c = self.config
        return StepPlan(Mode.FULL if counter_full_step(step, c.interval, c.first_enhance, c.phase) else Mode.REUSE)

    def modes(self):
        return {Mode.FULL} if self.config.interval == 1 else {Mode.FULL, Mode.REUSE}
