"""SKIP: the hidden state leaving the block stack is read from its cache; the blocks become dead."""
from __future__ import annotations

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
