"""SUBSET(k): compute a branch for k selected tokens per sample and scatter them into its cache.

The branch region is every node between the branch's input (the residual stream, or the branch
module's own input when that carries other tokens) and the raw output; ``token_copy`` copies it
onto the selected tokens. A parallel block's attention half is not copied: its k rows are read
from the cache FULL wrote, next to the freshly computed token-wise half. The raw output's users then read the cache after an in-place
``scatter_`` of the k fresh rows. With ClusCa propagation every cached row first moves towards
its cluster representative's fresh row (not at ``layout.plain_sites``); with Taylor orders the users read the forecast built on
the updated order-0 term.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..fallbacks import Fallback
from .find_sites import SiteMap
from .graph_paths import graph_fake_mode
from .layout import VariantContext, half_key, order_key
from .taylor_terms import forecast
from .token_copy import copy_on_tokens, emit, example_value

__all__ = ["subset_branches", "copy_on_tokens", "probe_subsets"]

aten = torch.ops.aten


def _expanded_index(graph: fx.Graph, idx: fx.Node, channels: int) -> fx.Node:
    return emit(graph, aten.expand.default, (emit(graph, aten.unsqueeze.default, (idx, -1)), [-1, -1, channels]))


def subset_branches(ctx: VariantContext) -> None:
    if ctx.skip_stack:
        return
    graph, nodes, gamma = ctx.gm.graph, ctx.nodes(), ctx.layout.propagation
    for site in ctx.sitemap.sites:
        if not isinstance(ctx.actions[site.name], int):
            continue
        raw, source = nodes[site.outputs[0]], nodes[site.subset_input]
        idx = ctx.input_nodes[("index", site.name)]
        cache = ctx.cache_nodes[order_key(site.name, 0)]
        out_ch = raw.meta["example_value"].shape[-1]
        halves = {nodes[site.attention_half]: ctx.cache_nodes[half_key(site.name)]} if site.attention_half else {}
        with graph.inserting_before(raw.next):
            fresh, env = copy_on_tokens(graph, raw, source, idx, halves)
            scatter_idx = _expanded_index(graph, idx, out_ch)
            if gamma is None or site.name in ctx.layout.plain_sites:
                updated = graph.call_function(aten.scatter_.src, (cache, 1, scatter_idx, fresh))
            else:   # ClusCa: every token moves towards its cluster's representative, then reps land
                rep = graph.call_function(aten.gather.default, (fresh, 1, _expanded_index(
                    graph, ctx.input_nodes[("assign", site.name)], out_ch)))
                mixed = graph.call_function(aten.add.Tensor, (graph.call_function(aten.mul.Tensor, (rep, gamma)),
                                                              graph.call_function(aten.mul.Tensor, (cache, 1 - gamma))))
                updated = graph.call_function(aten.scatter.src, (mixed, 1, scatter_idx, fresh))
                graph.call_function(aten.copy_.default, (cache, updated))
            result = forecast(ctx, site.name, 0, updated)
        copies = set(env.values())
        raw.replace_all_uses_with(result, delete_user_cb=lambda u: u not in copies
                                  and u is not updated and u is not result)


def probe_subsets(gm: fx.GraphModule, sitemap: SiteMap, parallel_blocks: bool = True) -> list[Fallback]:
    """Try each token-wise site's SUBSET copy on fake values; a site whose branch cannot run on k
    tokens (a reshape by the token count, an operand that cannot be gathered) is marked reused.
    ``parallel_blocks=False`` (a method that never runs them on k tokens) marks every parallel block
    reused, so that no attention half is cached for nothing. Returns a fallback per failed dry run.

    Only the errors that mean "this branch cannot run on k tokens" are caught: duca's own
    ValueError (a reshape it cannot follow) and RuntimeError (a shape error on fake tensors);
    anything else (a new torch's AttributeError, say) propagates."""
    from .clone_graph import clone_graph

    scratch = clone_graph(gm)
    graph = scratch.graph
    nodes = {n.name: n for n in graph.nodes}
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    failed = []

    def placeholder(like: torch.Tensor, shape, dtype) -> fx.Node:
        with graph.inserting_before(anchor):
            node = graph.placeholder(f"probe_{len(graph.nodes)}")
        with graph_fake_mode([like]):
            # on the graph's device: a CPU index against CUDA (or meta) values fails every probe
            node.meta["example_value"] = torch.empty(shape, dtype=dtype, device=like.device)
        return node

    for site in sitemap.sites:
        if site.parallel_subset and not parallel_blocks:
            site.subset_reason = "this method reuses a parallel block (attention and MLP in one projection) whole"
        if not site.subsettable:
            continue
        raw, source = nodes[site.outputs[0]], nodes[site.subset_input]
        tokens, value = site.tokens[0], example_value(raw)
        idx = placeholder(value, (int(value.shape[0]), max(tokens // 2, 1)), torch.int64)
        halves = {}
        if site.attention_half:
            half = example_value(nodes[site.attention_half])
            halves[nodes[site.attention_half]] = placeholder(half, half.shape, half.dtype)
        try:
            with graph.inserting_before(raw.next):
                copy_on_tokens(graph, raw, source, idx, halves)
        except (ValueError, RuntimeError) as e:
            site.subset_reason = f"the branch does not run on a subset of tokens ({type(e).__name__}: {e})"[:200]
            failed.append(Fallback("subset_reused", site.name, site.subset_reason))
    return failed
