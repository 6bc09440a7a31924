"""SUBSET(k): compute a branch for k selected tokens per sample and scatter them into its cache.

The branch region is every node between the residual stream entering the branch and the raw
output. It is copied with the stream replaced by ``gather(stream, idx)``; operands that do not
depend on the stream (gates, text K/V of cross-attention, weights) are shared unchanged. The raw
output's users then read the cache after an in-place ``scatter_`` of the k fresh rows. With ClusCa
propagation every cached row first moves towards its cluster representative's fresh row; with
Taylor orders the users read the forecast built on the updated order-0 term.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .layout import VariantContext, order_key
from .taylor_terms import forecast

__all__ = ["subset_branches"]

aten = torch.ops.aten


def _region(raw: fx.Node, stream: fx.Node) -> list[fx.Node]:
    """Nodes on some path stream -> raw (stream excluded), in graph order."""
    up: set[fx.Node] = set()
    todo = [raw]
    while todo:
        n = todo.pop()
        if n in up or n is stream:
            continue
        up.add(n)
        todo.extend(n.all_input_nodes)
    down: set[fx.Node] = {stream}
    for n in stream.graph.nodes:  # graph order is topological
        if n in up and any(a in down for a in n.all_input_nodes):
            down.add(n)
    return [n for n in stream.graph.nodes if n in up and n in down]


def _expanded_index(graph: fx.Graph, idx: fx.Node, channels: int) -> fx.Node:
    unsq = graph.call_function(aten.unsqueeze.default, (idx, -1))
    return graph.call_function(aten.expand.default, (unsq, [-1, -1, channels]))


def subset_branches(ctx: VariantContext) -> None:
    if ctx.skip_stack:
        return
    graph, nodes, gamma = ctx.gm.graph, ctx.nodes(), ctx.layout.propagation
    for site in ctx.sitemap.sites:
        if not isinstance(ctx.actions[site.name], int):
            continue
        raw, stream = nodes[site.outputs[0]], nodes[site.streams[0]]
        idx = ctx.input_nodes[("index", site.name)]
        cache = ctx.cache_nodes[order_key(site.name, 0)]
        region = _region(raw, stream)
        in_ch = stream.meta["example_value"].shape[-1]
        out_ch = raw.meta["example_value"].shape[-1]
        with graph.inserting_before(raw.next):
            gather_idx = _expanded_index(graph, idx, in_ch)
            env = {stream: graph.call_function(aten.gather.default, (stream, 1, gather_idx))}
            for n in region:
                env[n] = graph.node_copy(n, lambda a: env.get(a, a))
            fresh, scatter_idx = env[raw], _expanded_index(graph, idx, out_ch)
            if gamma is None:
                updated = graph.call_function(aten.scatter_.src, (cache, 1, scatter_idx, fresh))
            else:   # ClusCa: every token moves towards its cluster's representative, then reps land
                rep = graph.call_function(aten.gather.default, (fresh, 1, _expanded_index(
                    graph, ctx.input_nodes[("assign", site.name)], out_ch)))
                mixed = graph.call_function(aten.add.Tensor, (graph.call_function(aten.mul.Tensor, (rep, gamma)),
                                                              graph.call_function(aten.mul.Tensor, (cache, 1 - gamma))))
                updated = graph.call_function(aten.scatter.src, (mixed, 1, scatter_idx, fresh))
                graph.call_function(aten.copy_.default, (cache, updated))
            result = forecast(ctx, site.name, 0, updated)
        raw.replace_all_uses_with(result, delete_user_cb=lambda u: u not in env.values()
                                  and u is not updated and u is not result)
