"""Append the cache placeholders and the per-call inputs every variant takes after the originals.

All variants take the same caches in the same order (unused ones are simply not read), so the
runner passes one list whatever the step's mode; per-call inputs (token indices, cluster
assignments, Taylor coefficients) follow in ``CacheLayout.inputs`` order. Cache placeholders are
marked as static inputs, like parameters, so CUDA-graph trees neither copy nor skip them.
"""
from __future__ import annotations

import torch.fx as fx

from .. import _torch
from .layout import VariantContext

__all__ = ["add_cache_inputs"]


def _placeholder(ctx: VariantContext, name: str, shape, dtype, device, static: bool) -> fx.Node:
    graph = ctx.gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    _torch.set_source_name(node, name)
    if static:
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    if ctx.fake_mode is not None:
        import torch

        with ctx.fake_mode:
            node.meta["example_value"] = torch.empty(shape, dtype=dtype, device=device)
    return node


def add_cache_inputs(ctx: VariantContext) -> None:
    for spec in ctx.layout.caches:
        ctx.cache_nodes[spec.key] = _placeholder(ctx, spec.placeholder, spec.shape, spec.dtype, spec.device, True)
    for spec in ctx.layout.inputs(ctx.actions):
        ctx.input_nodes[(spec.kind, spec.site)] = _placeholder(ctx, spec.placeholder, spec.shape, spec.dtype,
                                                               spec.device, False)
