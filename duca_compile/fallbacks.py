"""Fallbacks: where duca runs or reports something other than what the method asked for.

Each one warns once per model and reason, is counted in ``stats()["fallbacks"]`` (reason -> how
many places: sites, graphs, plans) and listed by ``explain()``. Facts about a graph (found when it
is compiled, before any model calls it) are kept on its runner and noted in the state of every
model the graph serves; facts about a call are noted in that model's state directly.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REASONS", "Fallback"]

REASONS = {
    "subset_reused": "a token-wise site failed its SUBSET dry run and is reused on SUBSET steps instead",
    "plan_compiled_apart": "a SUBSET k-tuple the symbolic-k variant does not accept was compiled on its own",
    "flops_per_plan": "a SUBSET pattern's FLOPs could not be counted with symbolic k: each plan is counted apart",
    "graph_uncached": "a graph of the model runs plainly, without caching",
    "owner_by_frame_walk": "Dynamo did not say which module it compiled: the model is found by walking the call "
                           "stack at run time",
}


@dataclass(frozen=True)
class Fallback:
    reason: str          # a key of REASONS
    where: str           # the site, graph or plan it concerns
    detail: str          # why, in words (the exception, for a failed dry run)

    def __post_init__(self):
        if self.reason not in REASONS:
            raise ValueError(f"unknown fallback reason {self.reason!r}; known: {sorted(REASONS)}")

    def message(self) -> str:
        return (f"duca fallback [{self.reason}] at {self.where}: {self.detail}. {REASONS[self.reason]}. "
                "duca_compile.explain(model) lists every fallback, stats(model)['fallbacks'] counts them")
