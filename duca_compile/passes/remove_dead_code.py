"""Dead-code elimination that understands in-place writes into buffers nobody reads.

``Graph.eliminate_dead_code`` keeps every ``operator.setitem`` (impure), so a rotary embedding that
fills an ``empty_like`` buffer slice by slice (Wan) keeps its whole block alive in a SKIP variant;
and it treats in-place *methods* as pure, dropping ``x.add_(y)`` whose result is unused. Here a
mutation lives exactly when something reads the tensor it writes: a graph input (a cache), or any
live node aliasing it through views.

Waiting on a collective (``_c10d_functional.wait_tensor``) counts as pure, and so does an unread
random op: under context parallelism a reused branch's all-to-alls (or ring all-gathers) go with
its attention. That is safe only because every rank runs the same variant at every call (the same
step plan from the same inputs), so no rank waits for a peer that skipped the collective.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import _torch

__all__ = ["remove_dead_code"]

# Ops whose result may share storage with their first input.
_ALIASING = {"view", "view_as", "reshape", "reshape_as", "expand", "expand_as", "transpose", "permute", "unsqueeze",
             "squeeze", "flatten", "unflatten", "narrow", "select", "split", "chunk", "unbind", "t", "as_strided",
             "movedim", "swapaxes", "contiguous", "detach", "to", "type", "type_as", "float", "half", "bfloat16",
             "getitem", "unfold", "diagonal", "real", "imag", "view_as_real", "view_as_complex", "__getitem__"}


def _name(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t)).split(".")[0]


def _mutated(n: fx.Node) -> fx.Node | None:
    """The tensor an in-place node writes, or None."""
    if n.op not in ("call_function", "call_method") or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    if n.target is operator.setitem:
        return n.args[0]
    if isinstance(n.target, _torch.OpOverload):
        return n.args[0] if n.target._schema.is_mutable else None
    name = _name(n)
    return n.args[0] if name.endswith("_") and not name.startswith("_") else None


def _alias_groups(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    parent: dict[fx.Node, fx.Node] = {}

    def find(x):
        while parent.get(x, x) is not x:
            x = parent[x]
        return x

    for n in graph.nodes:
        if n.op in ("call_function", "call_method") and n.args and isinstance(n.args[0], fx.Node) \
                and (_name(n) in _ALIASING or _mutated(n) is not None):
            parent[find(n)] = find(n.args[0])      # an in-place op returns its input
    return {n: find(n) for n in graph.nodes}


def _waits() -> set:
    ops = getattr(torch.ops, "_c10d_functional", None)
    # Dynamo's graphs name the packet, Inductor's the overload
    return {ops.wait_tensor, ops.wait_tensor.default} if ops is not None and hasattr(ops, "wait_tensor") else set()


def _impure(n: fx.Node, pure: set) -> bool:
    # A random op nobody reads is dead too (FX keeps it for the RNG state it advances): an
    # inference forward draws nothing, but the CPU flash-attention kernel that ring attention
    # runs counts as random (its dropout), which kept a reused branch's attention alive.
    return n.target not in pure and n.is_impure(impure_random=False)


def remove_dead_code(graph: fx.Graph) -> int:
    """Erase every node no output, impure op or read-back mutation needs; returns how many."""
    group = _alias_groups(graph)
    mutations = [n for n in graph.nodes if _mutated(n) is not None]
    live: set[fx.Node] = set()
    live_groups = {group[n] for n in graph.nodes if n.op == "placeholder"}

    def mark(root: fx.Node) -> None:
        todo = [root]
        while todo:
            n = todo.pop()
            if n in live:
                continue
            live.add(n)
            live_groups.add(group[n])
            todo.extend(n.all_input_nodes)

    pure = _waits()
    for n in graph.nodes:
        if n.op == "output" or (n.op != "placeholder" and _mutated(n) is None and _impure(n, pure)):
            mark(n)
    changed = True
    while changed:
        changed = False
        for m in mutations:
            if m not in live and group[m] in live_groups:
                mark(m)
                changed = True
    removed = 0
    for n in reversed(list(graph.nodes)):
        if n not in live and n.op != "placeholder":
            graph.erase_node(n)
            removed += 1
    return removed
