"""REUSE: a branch's raw output is read from its cache (or forecast from its Taylor terms), so the
branch computation becomes dead. Gates, shifts and norms outside the branch still run, with the
current step's conditioning.
"""
from __future__ import annotations

from .layout import VariantContext, order_key
from .taylor_terms import forecast

__all__ = ["reuse_branches"]


def reuse_branches(ctx: VariantContext) -> None:
    if ctx.skip_stack:
        return
    graph, nodes = ctx.gm.graph, ctx.nodes()
    for site in ctx.sitemap.sites:
        if ctx.actions[site.name] != "reuse":
            continue
        for i, name in enumerate(site.outputs):
            raw = nodes[name]
            with graph.inserting_before(raw):
                value = forecast(ctx, site.name, i, ctx.cache_nodes[order_key(site.name, i)])
            raw.replace_all_uses_with(value)
