"""SUBSET(k): compute a branch for k selected tokens per sample and scatter them into its cache.

The branch region is every node between the branch's input (the residual stream, or the branch
module's own input when that carries other tokens) and the raw output; ``token_copy`` copies it
onto the selected tokens. The raw output's users then read the cache after an in-place
``scatter_`` of the k fresh rows. With ClusCa propagation every cached row first moves towards
its cluster representative's fresh row; with Taylor orders the users read the forecast built on
the updated order-0 term.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .find_sites import SiteMap
from .graph_paths import graph_fake_mode
from .layout import VariantContext, order_key
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
        with graph.inserting_before(raw.next):
            fresh, env = copy_on_tokens(graph, raw, source, idx)
            scatter_idx = _expanded_index(graph, idx, out_ch)
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
        copies = set(env.values())
        raw.replace_all_uses_with(result, delete_user_cb=lambda u: u not in copies
                                  and u is not updated and u is not result)


def probe_subsets(gm: fx.GraphModule, sitemap: SiteMap) -> None:
    """Try each token-wise site's SUBSET copy on fake values; a site whose branch cannot run on k
    tokens (a reshape by the token count, an operand that cannot be gathered) is marked reused."""
    from .clone_graph import clone_graph

    scratch = clone_graph(gm)
    graph = scratch.graph
    nodes = {n.name: n for n in graph.nodes}
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    for site in sitemap.sites:
        if not site.subsettable:
            continue
        raw, source = nodes[site.outputs[0]], nodes[site.subset_input]
        tokens, batch = site.tokens[0], int(example_value(raw).shape[0])
        with graph.inserting_before(anchor):
            idx = graph.placeholder(f"probe_{len(graph.nodes)}")
        with graph_fake_mode([example_value(raw)]):
            # on the graph's device: a CPU index against CUDA (or meta) values fails every probe
            idx.meta["example_value"] = torch.empty(batch, max(tokens // 2, 1), dtype=torch.int64,
                                                    device=example_value(raw).device)
        try:
            with graph.inserting_before(raw.next):
                copy_on_tokens(graph, raw, source, idx)
        except Exception as e:  # noqa: BLE001 - any failure means "not token-wise here"
            site.subset_reason = f"the branch does not run on a subset of tokens ({type(e).__name__}: {e})"[:200]
