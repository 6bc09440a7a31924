"""Forecast bases: what multiplies each finite difference ``Δ^i`` of a branch, ``k`` steps after its
last full step. The differences are TaylorSeer's in every basis; only the coefficients change, so a
basis is a different host-computed table for the same compiled variants.

- ``"taylor"`` (TaylorSeer): ``k^i / i!``.
- ``"hermite"`` (HiCache, arXiv 2508.16984): ``σ^i · H_i(σ·k) / i!`` with the physicists' Hermite
  polynomials (``H_1(x) = 2x``) and one scale ``σ`` used twice, inside ``H_i`` and as ``σ^i`` (the
  "dual scaling"; constant σ, the code's ``HiCache`` mode). At σ = 1/√2 order 1 is TaylorSeer's.
"""
from __future__ import annotations

import math

from .base import check_number

__all__ = ["BASES", "coefficient", "hermite", "check_basis"]

BASES = ("taylor", "hermite")


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
    if name == "hermite":
        return scale ** i * hermite(i, scale * k) / math.factorial(i)
    return k ** i / math.factorial(i)


def check_basis(owner: str, forecast: str, scale: float, allowed=BASES) -> None:
    if forecast not in allowed:
        raise ValueError(f"{owner}.forecast must be one of {allowed}, got {forecast!r}")
    check_number(owner, "hermite_scale", scale, 0.0, open_interval=True)
