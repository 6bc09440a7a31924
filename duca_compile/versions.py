"""The versions duca-compile is tested with, and the one warning at import for any other."""
from __future__ import annotations

import importlib.metadata
import warnings

from . import _torch

__all__ = ["TESTED_DIFFUSERS", "TESTED_PYTHON", "warn_if_untested", "version_of", "in_range", "range_text"]

TESTED_DIFFUSERS = ((0, 42), (0, 42))
TESTED_PYTHON = ((3, 11), (3, 12))


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_range(version: str | None, tested) -> bool | None:
    return None if version is None else tested[0] <= _torch.torch_version(version) <= tested[1]


def range_text(tested) -> str:
    (a, b), (c, d) = tested
    return f"{a}.{b} to {c}.{d}"


def warn_if_untested() -> None:
    """At import: one warning each for a torch or diffusers outside the tested range (duca still runs)."""
    _torch.warn_if_untested()
    diffusers = version_of("diffusers")
    if in_range(diffusers, TESTED_DIFFUSERS) is False:
        warnings.warn(f"duca_compile is tested with diffusers {range_text(TESTED_DIFFUSERS)}; this is diffusers "
                      f"{diffusers}. It may work; `python -m duca_compile.doctor` says more.", stacklevel=3)
