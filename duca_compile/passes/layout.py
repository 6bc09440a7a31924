"""Shared data of the variant passes: which caches exist and what one variant's rewrite needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch
import torch.fx as fx

from .find_sites import SiteMap

__all__ = ["Action", "CacheSpec", "IndexSpec", "CacheLayout", "VariantContext"]

# Per-site action of one variant: compute (and write the cache), reuse the cache, or compute k tokens.
Action = Union[str, int]


@dataclass(frozen=True)
class CacheSpec:
    key: str              # "<site>:<output index>" or "stack:<index>"
    placeholder: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class IndexSpec:
    site: str
    placeholder: str
    shape: tuple          # (batch, k)
    device: torch.device


@dataclass
class CacheLayout:
    """Every cache a graph needs, in the fixed order all its variants take them."""

    caches: list[CacheSpec]
    batch: int
    sitemap: SiteMap

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, sitemap: SiteMap) -> "CacheLayout":
        nodes = {n.name: n for n in gm.graph.nodes}
        caches, batch = [], None

        def spec(key, name):
            val = nodes[name].meta["example_value"]
            caches.append(CacheSpec(key, f"duca_cache_{len(caches)}", tuple(int(s) for s in val.shape),
                                    val.dtype, val.device))
            return val

        for site in sitemap.sites:
            for i, name in enumerate(site.outputs):
                batch = int(spec(f"{site.name}:{i}", name).shape[0])
        for i, name in enumerate(sitemap.stack_outputs):
            spec(f"stack:{i}", name)
        return cls(caches=caches, batch=batch or 0, sitemap=sitemap)

    def index_specs(self, actions: dict[str, Action]) -> list[IndexSpec]:
        specs = []
        for site in self.sitemap.sites:
            k = actions.get(site.name)
            if isinstance(k, int):
                device = next(c.device for c in self.caches if c.key == f"{site.name}:0")
                specs.append(IndexSpec(site.name, f"duca_index_{len(specs)}", (self.batch, k), device))
        return specs


@dataclass
class VariantContext:
    gm: fx.GraphModule
    sitemap: SiteMap
    layout: CacheLayout
    actions: dict[str, Action]
    skip_stack: bool
    fake_mode: object = None
    cache_nodes: dict[str, fx.Node] = field(default_factory=dict)
    index_nodes: dict[str, fx.Node] = field(default_factory=dict)

    def nodes(self) -> dict[str, fx.Node]:
        return {n.name: n for n in self.gm.graph.nodes}
