"""FULL (and the computed sites of other variants): write fresh outputs into their caches in place.
A SKIP step writes no stack output; the sites it still computes (blocks that are full on that step
only to refresh their caches) write theirs.

``aten.copy_`` into a graph input is functionalized by AOTAutograd and becomes an in-place store
Inductor fuses into the producing kernel; the output's users keep reading the fresh value. With
Taylor orders a computed site also refreshes its finite differences; a parallel block that runs on
k tokens on SUBSET steps also writes its attention half, and with ClusCa the last token-wise site
of each token count writes the stream after it (what k-means clusters).
"""
from __future__ import annotations

import torch

from .layout import VariantContext, cluster_key, half_key
from .taylor_terms import write_differences

__all__ = ["write_caches"]


def write_caches(ctx: VariantContext) -> None:
    graph, nodes = ctx.gm.graph, ctx.nodes()
    for i, name in enumerate(ctx.sitemap.stack_outputs if not ctx.skip_stack else ()):
        with graph.inserting_before(nodes[name].next):
            graph.call_function(torch.ops.aten.copy_.default, (ctx.cache_nodes[f"stack:{i}"], nodes[name]))
    for site in ctx.sitemap.sites:
        if ctx.actions[site.name] != "compute":
            continue
        for i, name in enumerate(site.outputs):
            with graph.inserting_before(nodes[name].next):
                write_differences(ctx, site.name, i, nodes[name])
        if half_key(site.name) in ctx.cache_nodes:      # a parallel block's attention half, for SUBSET steps
            _copy_into(graph, ctx.cache_nodes[half_key(site.name)], nodes[site.attention_half])
    for tokens, site in ctx.layout.cluster_sources.items():   # ClusCa: the stream k-means runs on
        if ctx.actions[site.name] == "compute":
            _copy_into(graph, ctx.cache_nodes[cluster_key(tokens)], nodes[site.residual])


def _copy_into(graph, cache, value) -> None:
    with graph.inserting_before(value.next):
        graph.call_function(torch.ops.aten.copy_.default, (cache, value))
