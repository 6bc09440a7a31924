"""kv-norm scores (DuCa's V-caching): where self-attention runs, cache ``Σ_heads (1 − ‖v_h‖)`` per token
(per stream: joint attention's value holds text and image tokens, each a slice of its token axis).

The value tensor comes out of the QKV projection anyway, so no attention map is formed and fused
attention stays fused. The runner turns the cached sums into token scores for the block's sites.
"""
from __future__ import annotations

import torch

from .layout import VariantContext, vnorm_key

__all__ = ["record_value_norms"]

aten = torch.ops.aten


def record_value_norms(ctx: VariantContext) -> None:
    if not ctx.layout.value_norms:
        return
    graph, nodes = ctx.gm.graph, ctx.nodes()
    computed = {s.block for s in ctx.sitemap.sites if s.kind == "self_attn" and ctx.actions[s.name] == "compute"}
    for block, slices in ctx.layout.value_norms.items():
        if block not in computed:
            continue
        for v in slices:
            value = nodes[v.node]             # [batch, heads, T, head_dim] or, under CP, [batch, T, heads, head_dim]
            with graph.inserting_before(value.next):
                rows = graph.call_function(aten.slice.Tensor, (value, v.token_axis, v.start, v.start + v.tokens))
                v32 = graph.call_function(aten._to_copy.default, (rows,), {"dtype": torch.float32})
                norm = graph.call_function(aten.linalg_vector_norm.default, (v32, 2, [-1]))
                score = graph.call_function(aten.sum.dim_IntList,
                                            (graph.call_function(aten.rsub.Scalar, (norm, 1)), [v.head_axis]))
                graph.call_function(aten.copy_.default, (ctx.cache_nodes[vnorm_key(block, v.tokens)], score))
