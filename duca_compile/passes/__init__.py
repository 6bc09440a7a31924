"""The FX rewrites that turn one Dynamo graph into cache-aware variants.

``VARIANT_PASSES`` is the whole pipeline, in order; each pass is ``fn(ctx) -> None`` and edits
``ctx.gm`` in place. Invariants every pass keeps are written in ``docs/architecture.md``.
"""
from __future__ import annotations

import logging

import torch.fx as fx

from .add_cache_inputs import add_cache_inputs
from .clone_graph import clone_graph
from .find_sites import Site, SiteMap, find_sites
from .layout import Action, CacheLayout, InputSpec, VariantContext, order_key, vnorm_key
from .record_value_norms import record_value_norms
from .remove_dead_code import remove_dead_code
from .reuse_branches import reuse_branches
from .skip_stack import skip_stack
from .subset_branches import probe_subsets, subset_branches
from .write_caches import write_caches

__all__ = ["VARIANT_PASSES", "build_variant", "find_sites", "probe_subsets", "Site", "SiteMap", "CacheLayout", "Action", "InputSpec", "order_key", "vnorm_key"]

log = logging.getLogger(__name__)

VARIANT_PASSES = [add_cache_inputs, skip_stack, reuse_branches, subset_branches, write_caches, record_value_norms]


def build_variant(gm: fx.GraphModule, sitemap: SiteMap, layout: CacheLayout, actions: dict[str, Action],
                  skip: bool, fake_mode=None) -> fx.GraphModule:
    """A new GraphModule computing ``gm`` under one plan: per-site actions, or the whole stack skipped."""
    ctx = VariantContext(clone_graph(gm), sitemap, layout, dict(actions), skip, fake_mode)
    for p in VARIANT_PASSES:
        p(ctx)
        log.debug("duca pass %s done", p.__name__)
    remove_dead_code(ctx.gm.graph)
    ctx.gm.graph.lint()
    ctx.gm.recompile()
    return ctx.gm
