"""A static schedule from calibrated magnitude ratios: MagCache's accumulated-error rule (arXiv
2506.09045), decided before the request from ratios measured once on an uncached request
(``duca_compile.calibrate``), so every step is an ordinary FULL or REUSE plan: nothing is decided
from the data at run time, no host read, no graph break.

The rule, as diffusers' ``MagCacheConfig`` applies it per step: the first ``round(retention · T)``
steps compute; after them each step multiplies the running ratio by its ``mag_ratio``, adds
``|1 − running ratio|`` to the running error, and reuses when the error is ``<= threshold`` and at
most ``max_skip`` steps ran since the last computed one; otherwise it computes and starts afresh.
Ratios of another length than T are resampled to T (nearest, as MagCache does).
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
from dataclasses import dataclass

from .base import CacheConfig, CachePolicy, Mode, StepPlan, check_int, check_number, check_unit, register_policy

__all__ = ["CalibratedConfig", "CalibratedPolicy", "calibrated_full_steps", "resample"]


@dataclass(frozen=True)
class CalibratedConfig(CacheConfig):
    """mag_ratios (`tuple[float, ...]`): per-step ratios of the block stack's residual magnitude,
        from ``duca_compile.calibrate`` (or a ``Calibration`` JSON: ``CalibratedConfig.from_file``).
    threshold (`float`, defaults to `0.12`): accumulated error allowed before a step computes again.
    max_skip (`int`, defaults to `4`): at most this many reused steps in a row.
    retention (`float`, defaults to `0.2`): the first ``round(retention · T)`` steps always compute.
    max_order (`int`, defaults to `0`): reused steps forecast each branch from finite differences of
        the computed ones (TaylorSeer's forecast over the uneven gaps); 0 reuses, as MagCache does."""

    mag_ratios: tuple = ()
    threshold: float = 0.12
    max_skip: int = 4
    retention: float = 0.2
    max_order: int = 0

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        ratios = self.mag_ratios
        if not isinstance(ratios, (tuple, list)) or not ratios or any(
                isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0
                for r in ratios):
            raise ValueError(f"{owner}.mag_ratios must be a non-empty sequence of finite positive numbers "
                             f"(from duca_compile.calibrate), got {ratios!r}")
        object.__setattr__(self, "mag_ratios", tuple(float(r) for r in ratios))
        check_number(owner, "threshold", self.threshold, 0.0)
        check_int(owner, "max_skip", self.max_skip, 0)
        check_unit(owner, "retention", self.retention)
        check_int(owner, "max_order", self.max_order, 0)

    @classmethod
    def from_file(cls, path, **fields) -> "CalibratedConfig":
        """A config with the ratios of a saved ``Calibration`` (``Calibration.save``)."""
        data = json.loads(pathlib.Path(path).read_text())
        if "mag_ratios" not in data:
            raise ValueError(f"{path}: not a duca_compile calibration (no 'mag_ratios')")
        return cls(mag_ratios=tuple(data["mag_ratios"]), **fields)


def resample(ratios: tuple, num_steps: int) -> tuple:
    """Nearest-index resampling of the ratios to ``num_steps`` entries (MagCache's ``nearest_interp``)."""
    if len(ratios) == num_steps:
        return ratios
    if num_steps == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (num_steps - 1)
    return tuple(ratios[round(i * scale)] for i in range(num_steps))


@functools.lru_cache(maxsize=64)
def calibrated_full_steps(ratios: tuple, num_steps: int, threshold: float, max_skip: int,
                          retention: float) -> tuple:
    """Per step of a T-step request: True where it computes."""
    ratios = resample(ratios, num_steps)
    keep = int(retention * num_steps + 0.5)
    full, ratio, err, run = [], 1.0, 0.0, 0
    for step in range(num_steps):
        if step < keep or step == 0:         # step 0 has nothing to reuse
            full.append(True)
            continue
        ratio *= ratios[step]
        run += 1
        err += abs(1.0 - ratio)
        if err <= threshold and run <= max_skip:
            full.append(False)
        else:
            full.append(True)
            ratio, err, run = 1.0, 0.0, 0
    return tuple(full)


@register_policy(CalibratedConfig)
class CalibratedPolicy(CachePolicy):
    needs_num_steps = True

    def __init__(self, config):
        super().__init__(config)
        self.taylor_orders = config.max_order      # differences from step 1 on: no warm-up rule here

    def full_steps(self, num_steps: int) -> tuple:
        c = self.config
        return calibrated_full_steps(c.mag_ratios, num_steps, c.threshold, c.max_skip, c.retention)

    def plan(self, step, num_steps=None):
        full = self.full_steps(self.require_num_steps(num_steps))
        return StepPlan(Mode.FULL if step >= len(full) or full[step] else Mode.REUSE)

    def modes(self):
        return {Mode.FULL, Mode.REUSE}
