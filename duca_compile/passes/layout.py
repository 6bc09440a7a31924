"""Shared data of the variant passes: which caches and extra inputs exist, and one variant's rewrite."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch
import torch.fx as fx

from .find_sites import Site, SiteMap
from .graph_paths import ancestors_in_block, is_collective, is_sdpa, token_count

__all__ = ["ValueNorm", "vnorm_key", "Action", "CacheSpec", "InputSpec", "CacheLayout", "VariantContext", "order_key",
           "half_key", "cluster_key", "last_token_wise"]

# Per-site action of one variant: compute (and write the cache), reuse the cache, or compute k tokens.
Action = Union[str, int]


def order_key(site: str, output: int, order: int = 0) -> str:
    """Cache key of one site output's order-``order`` Taylor term (order 0 is the output itself)."""
    return f"{site}:{output}" if order == 0 else f"{site}:{output}:d{order}"


def cluster_key(tokens: int) -> str:
    """Cache key of ClusCa's clustering input for ``tokens`` tokens (``CacheLayout.cluster_sources``)."""
    return f"cluster:{tokens}"


def last_token_wise(sites) -> dict[int, Site]:
    """Token count -> the last site (in graph order) with that many tokens that can run on k tokens."""
    return {s.tokens[0]: s for s in sites if s.subsettable}


def half_key(site: str) -> str:
    """Cache key of a parallel block's attention half (``Site.attention_half``)."""
    return f"{site}:attention-half"


@dataclass(frozen=True)
class CacheSpec:
    key: str              # order_key(...), half_key(site), "stack:<index>", vnorm_key(block, tokens), cluster_key(tokens)
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


@dataclass(frozen=True)
class ValueNorm:
    """Where a block's token scores come from (kv-norm): the self-attention value node
    ``[batch, heads, T, head_dim]``, rows ``start .. start + tokens`` of its token axis (joint
    attention holds the text and image tokens in one value: each stream is a slice). Under
    context parallelism it is the rank's value before the exchange, ``[batch, T, heads, head_dim]``
    (``token_axis`` 1): its own tokens with every head, as one process would score them."""

    node: str
    start: int
    tokens: int
    token_axis: int = 2
    head_axis: int = 1


def vnorm_key(block: str, tokens: int) -> str:
    return f"vnorm:{block}:{tokens}"


@dataclass
class CacheLayout:
    """Every cache and extra input a graph's variants take, in one fixed order.

    orders: Taylor terms kept beyond order 0 (TaylorSeer/ClusCa); propagation: ClusCa's gamma
    (SUBSET sites then also take a cluster assignment); value_norms: block -> the self-attention
    value slices whose per-head norms are cached for kv-norm token scores, one per token count.
    A parallel block that can run on k tokens also caches its attention half. With propagation,
    ``cluster_sources`` maps each token count of the token-wise sites to the last such site: the
    stream after it (its residual add) is cached on FULL steps for k-means, as the official code
    clusters the hidden state after the last block of that stream (DiT block 27, FLUX double block
    18, image and text apart). ``plain_sites``: SUBSET sites that scatter without propagation.
    """

    caches: list[CacheSpec]
    batch: int
    sitemap: SiteMap
    orders: int = 0
    propagation: float | None = None
    forecast: str = "taylor"          # "foca": the terms are FoCa's [F, D, C] (policies.forecasts)
    value_norms: dict[str, list[ValueNorm]] = field(default_factory=dict)
    cluster_sources: dict[int, Site] = field(default_factory=dict)
    plain_sites: frozenset = frozenset()

    @classmethod
    def from_graph(cls, gm: fx.GraphModule, sitemap: SiteMap, orders: int = 0, propagation: float | None = None,
                   value_norms: bool = False, plain_sites=frozenset(), forecast: str = "taylor") -> "CacheLayout":
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
            if site.parallel_subset:
                val = nodes[site.attention_half].meta["example_value"]
                spec(half_key(site.name), val.shape, val.dtype, val.device)
        for i, name in enumerate(sitemap.stack_outputs):
            val = nodes[name].meta["example_value"]
            spec(f"stack:{i}", val.shape, val.dtype, val.device)
        sources = {t: s for t, s in last_token_wise(sitemap.sites).items()
                   if s.residual and token_count(nodes[s.residual]) == t} if propagation is not None else {}
        for tokens, site in sources.items():
            val = nodes[site.residual].meta["example_value"]
            spec(cluster_key(tokens), val.shape, val.dtype, val.device)
        norms = _value_nodes(gm, sitemap) if value_norms else {}
        for block, slices in norms.items():
            for v in slices:
                val = nodes[v.node].meta["example_value"]       # [batch, heads, T, head_dim]
                spec(vnorm_key(block, v.tokens), (val.shape[0], v.tokens), torch.float32, val.device)
        return cls(caches=caches, batch=batch or 0, sitemap=sitemap, orders=orders, propagation=propagation,
                   forecast=forecast, value_norms=norms, cluster_sources=sources,
                   plain_sites=frozenset(plain_sites))

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
                if self.propagation is not None and site.name not in self.plain_sites:
                    add("assign", site.name, (cache.shape[0], site.tokens[0]), torch.int64, cache.device)
        return out


def _value_nodes(gm: fx.GraphModule, sitemap: SiteMap) -> dict[str, list[ValueNorm]]:
    """Per block with token-wise sites: the slices of its self-attention's value input (passed
    positionally or as ``value=``) that hold those sites' tokens. ValueError naming the site when
    a token-wise site has none: kv-norm would silently score it at random."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, list[ValueNorm]] = {}
    for site in sitemap.sites:
        if site.kind != "self_attn":
            continue
        wanted = {s.tokens[0] for s in sitemap.sites if s.block == site.block and s.subsettable}
        raw, stream = nodes[site.outputs[0]], nodes[site.streams[0]]
        for n in ancestors_in_block(raw, stream, site.block):
            value = n.args[2] if len(n.args) > 2 else n.kwargs.get("value")
            if not (is_sdpa(n) and isinstance(value, fx.Node)):
                continue
            val = value.meta.get("example_value")
            if isinstance(val, torch.Tensor) and val.ndim == 4:
                local = _before_exchange(value)
                slices = _token_slices(value, int(val.shape[2]), wanted) if local is None else \
                    _token_slices(local, int(local.meta["example_value"].shape[1]), wanted, token_axis=1)
                for v in slices:
                    if v not in out.setdefault(site.block, []):
                        out[site.block].append(v)
    for s in sitemap.sites:
        if s.subsettable and not any(v.tokens == s.tokens[0] for v in out.get(s.block, ())):
            raise ValueError(f"duca: selection='kv-norm' needs the self-attention value of {s.block} for the "
                             f"{s.tokens[0]} tokens of {s.name}, and the graph has none (no SDPA in the block, or "
                             "its value has other tokens); use selection='random' for this model")
    return out


def _before_exchange(value: fx.Node) -> fx.Node | None:
    """Under context parallelism the attention's value ``[batch, heads, S, head_dim]`` comes out of a
    collective (Ulysses' all-to-all: S = world x the rank's tokens, heads / world; ring's all-gather).
    Then the rank's own value before it: the first 4-d ancestor ``[batch, T, H, head_dim]`` with
    as many elements per row (T x H = S x heads); None when no collective feeds the value."""
    b, h, s, d = value.meta["example_value"].shape
    node, crossed = value, False
    for _ in range(24):                                 # view / permute / flatten / wait / exchange hops
        val = node.meta.get("example_value")
        if crossed and isinstance(val, torch.Tensor) and val.ndim == 4 and val.shape[0] == b \
                and val.shape[3] == d and val.shape[1] * val.shape[2] == s * h:
            return node
        crossed = crossed or is_collective(node)
        node = _only_tensor_input(node)
        if node is None:
            return None
    return None


def _only_tensor_input(node: fx.Node) -> fx.Node | None:
    """The one tensor ``node`` reads (a view, transpose, exchange, ... hop), else None."""
    inputs = [i for i in node.all_input_nodes if isinstance(i.meta.get("example_value"), torch.Tensor)]
    return inputs[0] if len(inputs) == 1 else None


def _token_slices(value: fx.Node, total: int, wanted: set, token_axis: int = 2) -> list[ValueNorm]:
    """The value's token rows that belong to each wanted token count: all of them, or, for joint
    attention, the parts of the ``cat`` along the token axis that built it (found through the
    head split / transposes in between)."""
    axes = {"token_axis": token_axis, "head_axis": 3 - token_axis}
    if total in wanted:
        return [ValueNorm(value.name, 0, total, **axes)]
    node = value
    for _ in range(8):                                  # view / transpose / permute / contiguous hops
        if node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.ops.aten.cat.default):
            parts = node.args[0]
            sizes = [p.meta["example_value"].shape for p in parts if isinstance(p, fx.Node)]
            if len(sizes) != len(parts):
                return []
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            dim = dim % len(sizes[0])
            lengths = [int(sz[dim]) for sz in sizes]
            if sum(lengths) != total:
                return []
            starts = [sum(lengths[:i]) for i in range(len(lengths))]
            return [ValueNorm(value.name, a, n, **axes) for a, n in zip(starts, lengths) if n in wanted]
        node = _only_tensor_input(node)
        if node is None:
            return []
    return []


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
