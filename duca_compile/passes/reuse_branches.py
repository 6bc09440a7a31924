"""REUSE: a branch's raw output is read from its cache, so the branch computation becomes dead.

Gates, shifts and norms outside the branch still run, with the current step's conditioning.
"""
from __future__ import annotations

from .layout import VariantContext

__all__ = ["reuse_branches"]


def reuse_branches(ctx: VariantContext) -> None:
    if ctx.skip_stack:
        return
    nodes = ctx.nodes()
    for site in ctx.sitemap.sites:
        if ctx.actions[site.name] != "reuse":
            continue
        for i, name in enumerate(site.outputs):
            nodes[name].replace_all_uses_with(ctx.cache_nodes[f"{site.name}:{i}"])
