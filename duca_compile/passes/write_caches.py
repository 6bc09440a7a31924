"""FULL (and the computed parts of other variants): write fresh outputs into their caches in place.

``aten.copy_`` into a graph input is functionalized by AOTAutograd and becomes an in-place store
Inductor fuses into the producing kernel; the output's users keep reading the fresh value.
"""
from __future__ import annotations

import torch

from .layout import VariantContext

__all__ = ["write_caches"]


def write_caches(ctx: VariantContext) -> None:
    graph, nodes = ctx.gm.graph, ctx.nodes()
    writes = []
    if not ctx.skip_stack:
        writes += [(f"stack:{i}", n) for i, n in enumerate(ctx.sitemap.stack_outputs)]
        for site in ctx.sitemap.sites:
            if ctx.actions[site.name] == "compute":
                writes += [(f"{site.name}:{i}", n) for i, n in enumerate(site.outputs)]
    for key, name in writes:
        node = nodes[name]
        with graph.inserting_after(node):
            graph.call_function(torch.ops.aten.copy_.default, (ctx.cache_nodes[key], node))
