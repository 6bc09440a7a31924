"""SKIP: the hidden state leaving the block stack is read from its cache; the blocks become dead."""
from __future__ import annotations

import torch

from .graph_paths import block_path
from .layout import VariantContext

__all__ = ["skip_stack"]


def skip_stack(ctx: VariantContext) -> None:
    if not ctx.skip_stack:
        return
    blocks = set(ctx.sitemap.blocks)
    nodes = ctx.nodes()
    for i, name in enumerate(ctx.sitemap.stack_outputs):
        out = nodes[name]
        cache = ctx.cache_nodes[f"stack:{i}"]
        # Only consumers outside the stack switch to the cache; inside uses die with the blocks.
        out.replace_all_uses_with(cache, delete_user_cb=lambda u: block_path(u) not in blocks)
        if any(u.op == "output" for u in cache.users):
            _return_copy(ctx, out, cache)


def _return_copy(ctx: VariantContext, out, cache) -> None:
    """A graph returning the stack output itself (a block graph) returns a copy of the cache with
    the strides the computed output has: a cache is never a graph output (nothing outside changes
    it in place), and the next block sees the input layout Dynamo guarded on (no recompile)."""
    graph, val = ctx.gm.graph, out.meta.get("example_value")
    output = next(u for u in cache.users if u.op == "output")
    with graph.inserting_before(output):
        if isinstance(val, torch.Tensor):
            empty = graph.call_function(torch.ops.aten.empty_strided.default, (tuple(val.shape), tuple(val.stride())),
                                        {"dtype": val.dtype, "device": val.device})
            copy = graph.call_function(torch.ops.aten.copy.default, (empty, cache))
        else:
            copy = graph.call_function(torch.ops.aten.clone.default, (cache,))
    copy.meta = {k: v for k, v in out.meta.items() if k != "nn_module_stack"}    # outside the blocks
    output.replace_input_with(cache, copy)
