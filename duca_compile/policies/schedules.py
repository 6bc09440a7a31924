"""Step and ratio schedules shared by the token-wise methods (ToCa, DuCa), as in the official code.

The official samplers index steps their own way: DiT's DDIM loop counts *down* (49 … 0), PixArt's
and OpenSora's count up. ``count_down`` maps our 0-based step to that index, so the formulas keep
their published form.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .base import CacheConfig, StepPlan, check_bool, check_int, check_number, check_unit

__all__ = ["RatioSchedule", "TokenConfig", "official_step", "cycle_residues", "SELECTIONS", "STEP_TYPES"]

SELECTIONS = ("random", "kv-norm")
STEP_TYPES = ("whole-step", "per-layer")


def official_step(step: int, num_steps: int | None, count_down: bool) -> int:
    return num_steps - 1 - step if count_down else step


@dataclass(frozen=True)
class RatioSchedule:
    """ToCa's ratio schedule ``R_eff = clamp(R · f_step · f_layer · f_module · f_list, 0, 1)``:
    ``f_step = 1 + w_s − 2·w_s·x/T`` (x the official step index), ``f_layer = 1 + w_l − 2·w_l·l/S``
    (S = ``layer_span``, or L−1), ``f_module = 1 − (1−τ)·w_m`` for attention and ``1 + τ·w_m`` for
    the feed-forward, ``f_list`` the factor of the site's block list in ``list_factors``.
    ``layers_per_list``: ``l`` counts within each block list (``transformer_blocks.i``,
    ``single_transformer_blocks.j``), as ToCa-FLUX's ``current['layer']`` does, instead of over the stack.
    A factor that reaches 0 means the site is reused, never partially computed."""

    step_weight: float = 0.0
    layer_weight: float = 0.0
    module_weight: float = 0.0
    module_tau: float = 0.5
    count_down: bool = False
    layer_span: int = 0
    layers_per_list: bool = False
    list_factors: tuple = ()

    def __post_init__(self):
        for name in ("step_weight", "layer_weight", "module_weight"):
            check_number("RatioSchedule", name, getattr(self, name))
        check_unit("RatioSchedule", "module_tau", self.module_tau)
        check_bool("RatioSchedule", "count_down", self.count_down)
        check_int("RatioSchedule", "layer_span", self.layer_span, 0)
        check_bool("RatioSchedule", "layers_per_list", self.layers_per_list)
        factors = self.list_factors
        if not isinstance(factors, (tuple, list)) or not all(
                isinstance(f, (tuple, list)) and len(f) == 2 and isinstance(f[0], str)
                and isinstance(f[1], (int, float)) and not isinstance(f[1], bool) and math.isfinite(f[1])
                for f in factors):
            raise ValueError("RatioSchedule.list_factors must be ((block list name, factor), ...), e.g. "
                             f"(('transformer_blocks', 0.4), ('single_transformer_blocks', 1.6)), got {factors!r}")
        object.__setattr__(self, "list_factors", tuple((str(n), float(f)) for n, f in factors))

    def factor(self, site, layers: int, step: int, num_steps: int | None) -> float:
        """The product of the factors for ``site`` (its ``kind``, ``layer`` and ``block``) at ``step``."""
        f = 1.0
        if self.step_weight:
            x = official_step(step, num_steps, self.count_down)
            f *= 1 + self.step_weight - 2 * self.step_weight * x / num_steps
        block_list, _, index = site.block.rpartition(".")
        layer = int(index) if self.layers_per_list and index.isdigit() else site.layer
        f *= 1 + self.layer_weight - 2 * self.layer_weight * layer / (self.layer_span or max(layers - 1, 1))
        f *= dict(self.list_factors).get(block_list, 1.0)
        w, tau = self.module_weight, self.module_tau
        return f * (1 + tau * w if site.kind == "ff" else 1 - (1 - tau) * w)


def cycle_residues(num_steps: int | None, step: int, interval: int, weight: float, count_down: bool,
                   forced: tuple, per_layer: bool = False) -> tuple[int, int]:
    """``(head, rest)``: the step's residue ``x % I`` in its first block and in the others, 0 for
    a full step (odd: conservative, even: aggressive).

    The official rule: full on the first step or when ``x % I == 0``; each full step recomputes
    ``I = round(interval / (1 + w − 2w·x/T))`` (or a forced value for ``lo <= x < hi``). With
    ``per_layer`` (the official DiT / PixArt code) the first block of a full step updates ``I`` and
    the later blocks decide their type again with it, so a step can be full in its first block only.
    """
    if not weight and not count_down and not forced:
        r = step % interval             # constant interval, counting up: no need for T
        return r, r
    return _residues(num_steps, interval, weight, count_down, forced, per_layer)[step]


@functools.lru_cache(maxsize=64)
def _residues(num_steps: int, interval: int, weight: float, count_down: bool, forced: tuple,
              per_layer: bool) -> tuple:
    out, I = [], interval
    for s in range(num_steps):
        x = official_step(s, num_steps, count_down)
        if s == 0 or x % I == 0:
            I = _interval_at(x, num_steps, interval, weight, forced)
            out.append((0, x % I if per_layer and s > 0 else 0))
        else:
            out.append((x % I, x % I))
    return tuple(out)


def forced_bounds(lo, hi, num_steps: int) -> tuple[int, int]:
    """A forced range's official steps: ints as written, fractions of T as ``int(f·T)`` (the official rule)."""
    if isinstance(lo, float):
        return int(lo * num_steps), int(hi * num_steps)
    return lo, hi


def _interval_at(x: int, num_steps: int, interval: int, weight: float, forced: tuple) -> int:
    for lo, hi, value in forced:
        lo, hi = forced_bounds(lo, hi, num_steps)
        if lo <= x < hi:
            return value
    if not weight:
        return interval
    # in float32 with round-half-to-even, as the official torch code: float64 rounds some halves up
    # (N=2, T=4: 2 / 0.8 is 2.5000000000000004 in float64, 2.5 -> 2 in float32)
    factor = torch.tensor(1 + weight - 2 * weight * x / num_steps, dtype=torch.float32)
    return max(1, int(torch.round(interval / factor)))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _forced_entry(f) -> bool:
    if not isinstance(f, (tuple, list)) or len(f) != 3 or not _is_int(f[2]) or f[2] < 1:
        return False
    lo, hi = f[0], f[1]
    if _is_int(lo) and _is_int(hi):
        return True
    return all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in (lo, hi))


@dataclass(frozen=True)
class TokenConfig(CacheConfig):
    """Fields of the token-wise methods (ToCa, DuCa).

    interval (`int`, defaults to `3`): N, steps per cycle; the first step of a cycle is FULL.
    ratio (`float`, defaults to `0.3`): R, fraction of tokens recomputed per site on conservative steps.
    selection (`str`, defaults to `"random"`): base token score, "random" (DuCa v2) or "kv-norm"
        (DuCa v1's V-caching: tokens whose value vectors have small norms first).
    soft_fresh_weight (`float`, defaults to `0.0`): λ3, weight of the staleness score s3
        (steps since a token was last computed, divided by ``interval``).
    spatial_grid (`int`, defaults to `0`): g of the spatial bonus s4 (0 = off): in each g×g patch
        of the token grid the best-scoring token gets ``+ spatial_bonus · score``.
    spatial_bonus (`float`, defaults to `0.0`): the s4 bonus.
    ratio_schedule (`RatioSchedule`, optional): per-step/layer/module factors on ``ratio``.
    interval_weight (`float`, defaults to `0.0`): w of the step-dependent interval
        ``I = round(N / (1 + w − 2w·x/T))`` (DiT: 0.4, i.e. ``N / (1.4 − 0.8·x/T)``).
    count_down (`bool`, defaults to `False`): official step index counts down (DiT's DDIM loop).
    forced_interval (`tuple`, defaults to `()`): ``((lo, hi, I), ...)``: interval forced to I for
        official steps lo <= x < hi; lo and hi are step indices (ints) or fractions of the request's
        T (floats in [0, 1], bound ``int(f·T)``). DiT: ``((0.2, 0.4, 2),)``, i.e. 10 <= x < 20 at T=50.
    k_multiple (`int`, defaults to `1`): round each site's k down to a multiple of this (at least
        2 tokens still run). Compile count does not depend on it: one SUBSET compile serves every k.
    warmup (`int`, defaults to `0`): the first ``warmup`` steps are FULL (ToCa-FLUX, OpenSora: 3).
    step_types (`str`, defaults to `"whole-step"`): how a step's type is decided when the interval
        changes. "whole-step": one type per step for every block, the interval updated after each
        full step. "per-layer": the official DiT and PixArt code, which decides per block: block 0
        of a full step updates the interval and the later blocks re-decide with the new one, so
        some full steps are full in block 0 only (conservative or aggressive in the others; on an
        aggressive one block 0 just refreshes its caches). Same schedule at a constant interval.
    """

    interval: int = 3
    ratio: float = 0.3
    selection: str = "random"
    soft_fresh_weight: float = 0.0
    spatial_grid: int = 0
    spatial_bonus: float = 0.0
    ratio_schedule: RatioSchedule | None = None
    interval_weight: float = 0.0
    count_down: bool = False
    forced_interval: tuple = ()
    k_multiple: int = 1
    warmup: int = 0
    step_types: str = "whole-step"

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_int(owner, "interval", self.interval, 1)
        check_unit(owner, "ratio", self.ratio)
        if not isinstance(self.selection, str) or self.selection not in SELECTIONS:
            raise ValueError(f"{owner}.selection must be one of {SELECTIONS}, got {self.selection!r} "
                             "(attention-map scores need the attention matrix, which fused attention never forms)")
        check_number(owner, "soft_fresh_weight", self.soft_fresh_weight, 0.0)
        check_number(owner, "spatial_bonus", self.spatial_bonus, 0.0)
        # I = N / (1 + w - 2w·x/T) needs a positive denominator at every step: -1 < w < 1
        check_number(owner, "interval_weight", self.interval_weight, -1.0, 1.0, open_interval=True)
        check_bool(owner, "count_down", self.count_down)
        check_int(owner, "spatial_grid", self.spatial_grid, 0)
        check_int(owner, "k_multiple", self.k_multiple, 1)
        check_int(owner, "warmup", self.warmup, 0)
        if self.step_types not in STEP_TYPES:
            raise ValueError(f"{owner}.step_types must be one of {STEP_TYPES}, got {self.step_types!r}")
        if self.ratio_schedule is not None and not isinstance(self.ratio_schedule, RatioSchedule):
            raise ValueError(f"{owner}.ratio_schedule must be a RatioSchedule, got {self.ratio_schedule!r}")
        forced = self.forced_interval
        if not isinstance(forced, (tuple, list)) or not all(_forced_entry(f) for f in forced):
            raise ValueError(f"{owner}.forced_interval must be ((lo, hi, interval>=1), ...) with lo, hi both "
                             f"step indices (ints) or both fractions of T (floats in [0, 1]), got {self.forced_interval!r}")
        object.__setattr__(self, "forced_interval", tuple(tuple(f) for f in forced))

    @property
    def needs_num_steps(self) -> bool:
        rs = self.ratio_schedule
        return bool(self.interval_weight or self.count_down or self.forced_interval or (rs and rs.step_weight))

    def residues(self, step: int, num_steps: int | None) -> tuple[int, int]:
        """The step's residue in block 0 and in the later blocks (0: full; see ``cycle_residues``)."""
        return cycle_residues(num_steps, step, self.interval, self.interval_weight, self.count_down,
                              self.forced_interval, self.step_types == "per-layer")

    def site_k(self, site, layers: int, plan: StepPlan, step: int, num_steps: int | None) -> int:
        ratio = plan.ratio
        if self.ratio_schedule is not None:
            f = self.ratio_schedule.factor(site, layers, step, num_steps)
            ratio = min(max(ratio * f, 0.0), 1.0)
        if ratio <= 0:
            return 0                              # a factor that reaches 0: the site is reused
        k = int(ratio * site.tokens[0])
        return max(k - k % self.k_multiple, 1)
