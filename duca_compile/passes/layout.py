"""Shared data of the variant passes: which caches and extra inputs exist, and one variant's rewrite."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch
import torch.fx as fx

from .find_sites import SiteMap
from .graph_paths import ancestors_in_block, is_sdpa

__all__ = ["Action", "CacheSpec", "InputSpec", "CacheLayout", "VariantContext", "order_key"]

# Per-site action of one variant: compute (and write the cache), reuse the cache, or compute k tokens.
Action = Union[str, int]


def order_key(site: str, output: int, order: int = 0) -> str:
    """Cache key of one site output's order-``order`` Taylor term (order 0 is the output itself)."""
    return f"{site}:{output}" if order == 0 else f"{site}:{output}:d{order}"


@dataclass(frozen=True)
class CacheSpec:
    key: str              # order_key(...), "stack:<index>" or "vnorm:<block>"
    placeholder: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class InputSpec:
    """A per-call input that is not a cache: token indices, cluster assignments, Taylor coefficients."""

    kind: str             # "index" [batch, k] | "assign" [batch, tokens] | "taylor_coef" | "taylor_w"
    site: str             # the site it feeds ("" for per-graph inputs)
    placeholder: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device


@dataclass
class CacheLayout:
    """Every cache and extra input a graph's variants take, in one fixed order.

    orders: Taylor terms kept beyond order 0 (TaylorSeer/ClusCa); propagation: ClusCa's gamma
    (SUBSET sites then also take a cluster assignment); value_norms: block -> the self-attention
    value node whose per-head norms are cached for kv-norm token scores.
    """

    caches: list[CacheSpec]
    batch: int
    sitemap: SiteMap
    orders: int = 0
    propagation: float | None = None
    value_norms: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, sitemap: SiteMap, orders: int = 0, propagation: float | None = None,
                   value_norms: bool = False) -> "CacheLayout":
        nodes = {n.name: n for n in gm.graph.nodes}
        caches, batch = [], None

        def spec(key, shape, dtype, device):
            caches.append(CacheSpec(key, f"duca_cache_{len(caches)}", tuple(int(s) for s in shape), dtype, device))

        for site in sitemap.sites:
            for i, name in enumerate(site.outputs):
                val = nodes[name].meta["example_value"]
                batch = int(val.shape[0])
                for m in range(orders + 1):
                    spec(order_key(site.name, i, m), val.shape, val.dtype, val.device)
        for i, name in enumerate(sitemap.stack_outputs):
            val = nodes[name].meta["example_value"]
            spec(f"stack:{i}", val.shape, val.dtype, val.device)
        norms = _value_nodes(gm, sitemap) if value_norms else {}
        for block, name in norms.items():
            val = nodes[name].meta["example_value"]       # [batch, heads, tokens, head_dim]
            spec(f"vnorm:{block}", (val.shape[0], val.shape[2]), torch.float32, val.device)
        return cls(caches=caches, batch=batch or 0, sitemap=sitemap, orders=orders, propagation=propagation,
                   value_norms=norms)

    def spec(self, key: str) -> CacheSpec:
        return next(c for c in self.caches if c.key == key)

    def inputs(self, actions: dict[str, Action]) -> list[InputSpec]:
        """The extra inputs of the variant for ``actions``, after the caches, in this order."""
        out: list[InputSpec] = []

        def add(kind, site, shape, dtype, device):
            out.append(InputSpec(kind, site, f"duca_{kind}_{len(out)}", tuple(shape), dtype, device))

        device = self.caches[0].device if self.caches else torch.device("cpu")
        if self.orders:
            n = len(self.sitemap.sites)
            add("taylor_coef", "", (n, self.orders + 1), torch.float32, device)
            add("taylor_w", "", (n, self.orders), torch.float32, device)
        for site in self.sitemap.sites:
            k = actions.get(site.name)
            if isinstance(k, int):
                # a site's own batch: Latte's temporal blocks run at batch × height × width
                cache = self.spec(order_key(site.name, 0))
                add("index", site.name, (cache.shape[0], k), torch.int64, cache.device)
                if self.propagation is not None:
                    add("assign", site.name, (cache.shape[0], site.tokens[0]), torch.int64, cache.device)
        return out


def _value_nodes(gm: fx.GraphModule, sitemap: SiteMap) -> dict[str, str]:
    """Per block with token-wise sites: the value input of its self-attention, if it has as many
    tokens as those sites (Flux's joint attention mixes text and image tokens, so it has not)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for site in sitemap.sites:
        if site.kind != "self_attn":
            continue
        wanted = {s.tokens[0] for s in sitemap.sites if s.block == site.block and s.subsettable}
        raw, stream = nodes[site.outputs[0]], nodes[site.streams[0]]
        for n in ancestors_in_block(raw, stream, site.block):
            if is_sdpa(n) and len(n.args) > 2 and isinstance(n.args[2], fx.Node):
                val = n.args[2].meta.get("example_value")
                if isinstance(val, torch.Tensor) and val.ndim == 4 and int(val.shape[2]) in wanted:
                    out[site.block] = n.args[2].name
    return out


@dataclass
class VariantContext:
    gm: fx.GraphModule
    sitemap: SiteMap
    layout: CacheLayout
    actions: dict[str, Action]
    skip_stack: bool
    fake_mode: object = None
    cache_nodes: dict[str, fx.Node] = field(default_factory=dict)
    input_nodes: dict[tuple[str, str], fx.Node] = field(default_factory=dict)   # (kind, site) -> placeholder

    def nodes(self) -> dict[str, fx.Node]:
        return {n.name: n for n in self.gm.graph.nodes}

    def site_row(self, site_name: str) -> int:
        return next(i for i, s in enumerate(self.sitemap.sites) if s.name == site_name)
