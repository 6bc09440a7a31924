"""Graph snippets for TaylorSeer terms: the forecast ``Σ_m Δ^m · coef_m`` and the difference update.

Coefficients arrive as a ``[sites, orders + 1]`` float32 input; a 0-d slice of it multiplies a
cache without changing the cache's dtype. With no Taylor orders both reduce to plain reuse/write.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..policies.forecasts import next_terms
from .layout import VariantContext, order_key

__all__ = ["forecast", "write_differences"]

aten = torch.ops.aten


def _coef(graph: fx.Graph, table: fx.Node, row: int, col: int) -> fx.Node:
    return graph.call_function(aten.select.int, (graph.call_function(aten.select.int, (table, 0, row)), 0, col))


def forecast(ctx: VariantContext, site: str, output: int, base: fx.Node) -> fx.Node:
    """``base + Σ_{m>=1} Δ^m · coef[row, m]`` (base is the order-0 term; coef[row, 0] is always 1)."""
    graph, acc = ctx.gm.graph, base
    table, row = ctx.input_nodes.get(("taylor_coef", "")), ctx.site_row(site)
    for m in range(1, ctx.layout.orders + 1):
        term = graph.call_function(aten.mul.Tensor, (ctx.cache_nodes[order_key(site, output, m)],
                                                     _coef(graph, table, row, m)))
        acc = graph.call_function(aten.add.Tensor, (acc, term))
    return acc


def write_differences(ctx: VariantContext, site: str, output: int, fresh: fx.Node) -> None:
    """Write the terms ``policies.forecasts.next_terms`` gives (TaylorSeer: ``Δ^0 = fresh``,
    ``Δ^{m+1} = (Δ^m_new − Δ^m_old) · w[row, m]``; FoCa: ``[F, D, C]``) in place.

    Every old term is read before any is overwritten; for TaylorSeer ``w`` is ``1/d`` for the
    orders the history allows and 0 beyond, so unreachable orders are written as zeros.
    """
    graph, row = ctx.gm.graph, ctx.site_row(site)
    table = ctx.input_nodes.get(("taylor_w", ""))
    old = [ctx.cache_nodes[order_key(site, output, m)] for m in range(ctx.layout.orders + 1)]
    terms = next_terms(ctx.layout.forecast, fresh, old, [_coef(graph, table, row, m) for m in range(ctx.layout.orders)],
                       sub=lambda a, b: graph.call_function(aten.sub.Tensor, (a, b)),
                       mul=lambda a, b: graph.call_function(aten.mul.Tensor, (a, b)))
    for cache, term in zip(old, terms):
        graph.call_function(aten.copy_.default, (cache, term))
