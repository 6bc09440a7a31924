"""Forecast bases: what multiplies each finite difference ``Δ^i`` of a branch, ``k`` steps after its
last full step. The differences are TaylorSeer's in every basis; only the coefficients change, so a
basis is a different host-computed table for the same compiled variants.

- ``"taylor"`` (TaylorSeer): ``k^i / i!``.
- ``"hermite"`` (HiCache, arXiv 2508.16984): ``σ^i · H_i(σ·k) / i!`` with the physicists' Hermite
  polynomials (``H_1(x) = 2x``) and one scale ``σ`` used twice, inside ``H_i`` and as ``σ^i`` (the
  "dual scaling"; constant σ, the code's ``HiCache`` mode). At σ = 1/√2 order 1 is TaylorSeer's.
- ``"foca"`` (FoCa, arXiv 2508.16211, as cache-dit's ``FoCaCalibrator`` implements it; the paper's
  code is unreleased): not a table on the same differences but a recursion. Each forecast starts
  from the last full value ``F`` and adds ``e/2`` (``e``: steps since it) times the sum of the
  anchors' difference ``D = F − F_prev_full`` and the latest local difference (the last two values,
  forecasts included); past ``e = 3`` the step-3 form is damped towards ``F`` by ``3/e``. Every
  forecast is ``F + α·D + β·C`` with ``C = F − (the value before F)``, so a branch keeps three
  terms ``[F, D, C]`` (``FoCa``: the host side; ``next_terms``: the update at a full step).
"""
from __future__ import annotations

import math

from .base import check_number

__all__ = ["BASES", "coefficient", "hermite", "check_basis", "FoCa", "next_terms", "FOCA_TERMS"]

BASES = ("taylor", "hermite", "foca")
FOCA_TERMS = 2            # differences FoCa keeps beyond F: D and C


def hermite(n: int, x: float) -> float:
    """The physicists' Hermite polynomial ``H_n(x)``: 1, 2x, then ``H_{n+1} = 2x H_n − 2n H_{n−1}``."""
    prev, cur = 1.0, 2.0 * x
    if n == 0:
        return prev
    for m in range(1, n):
        prev, cur = cur, 2.0 * x * cur - 2.0 * m * prev
    return cur


def coefficient(basis: tuple[str, float], k: float, i: int) -> float:
    """The weight of ``Δ^i`` ``k`` steps after the last full step; ``basis``: (name, scale)."""
    name, scale = basis
    if name == "foca":
        raise ValueError("FoCa's coefficients depend on the forecasts before them: use policies.forecasts.FoCa")
    if name == "hermite":
        return scale ** i * hermite(i, scale * k) / math.factorial(i)
    return k ** i / math.factorial(i)


def check_basis(owner: str, forecast: str, scale: float, allowed=BASES) -> None:
    """A basis name in ``allowed``; with "foca" the order fields are not used (FoCa keeps ``[F, D, C]``)."""
    if forecast not in allowed:
        raise ValueError(f"{owner}.forecast must be one of {allowed}, got {forecast!r}")
    check_number(owner, "hermite_scale", scale, 0.0, open_interval=True)


class FoCa:
    """One branch's FoCa clock. Forecasts are tracked as coordinates ``(α, β)`` on ``D`` and ``C``
    of the last full step, so the compiled variants only ever see coefficient rows."""

    HORIZON = 3                # cache-dit's damping horizon

    def __init__(self):
        self.full_steps, self.last = 0, None
        self.value, self.previous = (0.0, 0.0), (0.0, 0.0)     # the last two values, as (α, β)

    def computed(self, step: int) -> list[float]:
        """A full step: the weights ``[α, β]`` of the value before it (``C = D − α·D_old − β·C_old``)."""
        w = list(self.value) if self.full_steps else [0.0, 0.0]
        self.full_steps, self.last = self.full_steps + 1, step
        self.value, self.previous = (0.0, 0.0), (0.0, -1.0)    # F itself, and F − C
        return w

    def cached(self, step: int) -> list[float]:
        """A forecast step: its coefficients on ``[F, D, C]``; plain reuse until two full steps."""
        if self.full_steps < 2:
            return [1.0, 0.0, 0.0]
        e = step - self.last
        scale = e / 2 if e <= self.HORIZON else self.HORIZON / e * self.HORIZON / 2
        local = (self.value[0] - self.previous[0], self.value[1] - self.previous[1])
        forecast = (scale * (1.0 + local[0]), scale * local[1])
        self.previous, self.value = self.value, forecast
        return [1.0, *forecast]


def next_terms(basis: str, fresh, old: list, w: list, sub, mul) -> list:
    """The terms a full step writes from ``fresh`` and the old terms (``sub``/``mul``: tensor ops or
    graph builders). TaylorSeer/Hermite: ``Δ^{m+1} = (Δ^m_new − Δ^m_old) · w_m``. FoCa:
    ``D = fresh − F_old`` and ``C = D − w_0·D_old − w_1·C_old``."""
    new = [fresh]
    if basis == "foca":
        new.append(sub(fresh, old[0]))
        new.append(sub(sub(new[1], mul(old[1], w[0])), mul(old[2], w[1])))
        return new
    for m in range(len(old) - 1):
        new.append(mul(sub(new[m], old[m]), w[m]))
    return new
