"""Copy an FX region onto k of its N tokens (the SUBSET rewrite's engine, also its dry run).

The region's input is replaced by ``gather(input, idx)``. Operands that do not depend on it
(weights, gates, text K/V of cross-attention) are shared unchanged, except those that broadcast
along the token axis: rotary tables, per-token modulation, query-shaped masks are gathered with
the same indices. The token axis of every copied node is read off its fake value (N tokens became
k), or, where context parallelism's exchange merged it with the ranks' axis ([world x k]),
followed structurally to the reshape that splits it again; the exchange itself gets the k-token
tensor's splits. Constant sizes naming the token count become -1 (k at run time).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import _torch
from .graph_paths import branch_region, graph_fake_mode, is_collective, is_sdpa

__all__ = ["copy_on_tokens", "emit", "example_value"]

aten = torch.ops.aten

_BROADCAST_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                        operator.pow, operator.iadd, operator.imul, torch.add, torch.sub, torch.mul, torch.div,
                        torch.where, torch.addcmul, torch.lerp, torch.maximum, torch.minimum, torch.cat,
                        torch.stack, aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor}
_BROADCAST_METHODS = {"add", "sub", "mul", "div", "addcmul", "lerp", "masked_fill", "where", "pow",
                      "add_", "sub_", "mul_", "div_", "addcmul_", "masked_fill_"}
_SHAPE_METHODS = {"view", "reshape", "expand"}          # Dynamo writes their sizes as constants


def _sizes(node: fx.Node) -> tuple[list, bool] | None:
    """The explicit sizes of a view / reshape / expand node, and whether they came as one tuple."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        rest = node.args[1:]
    elif node.op == "call_function" and node.target is torch.reshape:
        rest = node.args[1:]
    else:
        return None
    packed = len(rest) == 1 and isinstance(rest[0], (tuple, list))
    sizes = list(rest[0] if packed else rest)
    return (sizes, packed) if all(isinstance(x, int) for x in sizes) else None


def _output_axis(old_in, old_out, axis: int, expand: bool) -> int | None:
    """Where input ``axis`` lands in a reshape's (or expand's) output: the output dim with the same
    size and the same product of the dims before it; None if the reshape merges or splits it."""
    if expand:
        return axis + len(old_out) - len(old_in)
    before = 1
    for d in old_in[:axis]:
        before *= d
    acc = 1
    for j, d in enumerate(old_out):
        if acc == before and d == old_in[axis]:
            return j
        acc *= d
    return None


def example_value(n):
    return n.meta.get("example_value") if isinstance(n, fx.Node) else n


def _evaluate(node: fx.Node) -> None:
    """Set ``node``'s fake value from its inputs' (Dynamo-level targets: functions and methods)."""
    args = fx.node.map_arg(node.args, example_value)
    kwargs = fx.node.map_arg(node.kwargs, example_value)
    fake_mode = graph_fake_mode(example_value(a) for a in node.all_input_nodes)
    with fake_mode if fake_mode is not None else _torch.FakeTensorMode(allow_non_fake_inputs=True):
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
    node.meta["example_value"] = value


def _exchanged(node: fx.Node) -> fx.Node | None:
    """The ``flatten()`` whose all-to-all ``node`` reshapes back: reshape(wait(all_to_all(flatten(x))),
    x's shape); None for any other node."""
    found = _sizes(node)
    if found is None or node.target != "reshape":
        return None
    wait = node.args[0]
    if not (isinstance(wait, fx.Node) and is_collective(wait, "wait_tensor")):
        return None
    a2a = wait.args[0]
    if not (isinstance(a2a, fx.Node) and is_collective(a2a, "all_to_all_single")):
        return None
    flat = a2a.args[0]
    if not (isinstance(flat, fx.Node) and flat.op == "call_method" and flat.target == "flatten" and len(flat.args) == 1):
        return None
    return flat if list(example_value(flat.args[0]).shape) == list(found[0]) else None


def emit(graph: fx.Graph, target, args: tuple) -> fx.Node:
    node = graph.call_function(target, args)
    _evaluate(node)
    return node


def _broadcasts(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _BROADCAST_METHODS
    return node.op == "call_function" and node.target in _BROADCAST_FUNCTIONS


class _TokenCopy:
    """Copies a region onto k tokens, gathering outside operands that carry the N tokens."""

    def __init__(self, graph: fx.Graph, source: fx.Node, idx: fx.Node):
        self.graph, self.idx = graph, idx
        self.batch, self.k = example_value(idx).shape
        self.n = example_value(source).shape[1]
        self.env: dict[fx.Node, fx.Node] = {source: self.gather(source, 1)}
        self.gathered: dict[tuple, fx.Node] = {}
        # k read off the index at run time, for a size list that already holds a -1 (dead code if none)
        self.k_node = graph.call_method("size", (idx, 1))
        self.k_node.meta["example_value"] = self.k
        # token axes merged with the ranks' axis by a Ulysses exchange: original node -> (axis, outer),
        # the axis holding outer x tokens (sizes alone cannot tell it from a width of the same size)
        self.merged: dict[fx.Node, tuple[int, int]] = {}

    def gather(self, x: fx.Node, axis: int, ndim: int | None = None) -> fx.Node:
        """``x`` gathered along ``axis`` with the per-sample indices; a value without a batch axis is
        first given one (left-padded to ``ndim`` dims, batch expanded)."""
        g, shape = self.graph, list(example_value(x).shape)
        ndim = ndim or len(shape)
        if len(shape) < ndim or shape[0] != self.batch:
            shape = [1] * (ndim - len(shape)) + shape
            x = emit(g, aten.view.default, (x, shape))
            shape[0] = self.batch
            x = emit(g, aten.expand.default, (x, list(shape)))
        view = [self.batch] + [1] * (ndim - 1)
        view[axis] = -1                 # no literal k: one compiled variant serves every k
        index = emit(g, aten.view.default, (self.idx, view))
        shape[axis] = -1
        index = emit(g, aten.expand.default, (index, shape))
        return emit(g, aten.gather.default, (x, axis, index))

    def token_axes(self, orig: fx.Node) -> list[int]:
        old, new = example_value(orig), example_value(self.env[orig])
        if not isinstance(old, torch.Tensor) or old.ndim != new.ndim:
            return []
        return [d for d in range(old.ndim) if old.shape[d] == self.n and new.shape[d] == self.k]

    def outside_operand(self, node: fx.Node, x: fx.Node) -> fx.Node:
        """``x`` as ``node``'s copy must read it: gathered if it broadcasts along a token axis."""
        val = example_value(x)
        if not isinstance(val, torch.Tensor) or val.ndim == 0:
            return x
        if is_sdpa(node):           # a mask with a query axis broadcasts to [batch, heads, Lq, Lk]
            query = node.args[0] if node.args else node.kwargs.get("query")
            if query in self.env and x is not query and 2 <= val.ndim <= 4 and val.shape[-2] == self.n:
                return self._cached(x, 2, 4)
            return x
        if not _broadcasts(node):
            return x
        for y in node.all_input_nodes:
            if y not in self.env:
                continue
            ndim = example_value(y).ndim
            for t in self.token_axes(y):
                aligned = t - (ndim - val.ndim)
                if 0 <= aligned < val.ndim and val.shape[aligned] == self.n:
                    return self._cached(x, t, ndim)
        return x

    def _cached(self, x: fx.Node, axis: int, ndim: int) -> fx.Node:
        key = (x, axis, ndim)
        if key not in self.gathered:
            self.gathered[key] = self.gather(x, axis, ndim)
        return self.gathered[key]

    def retarget_sizes(self, orig: fx.Node, copy: fx.Node) -> None:
        """A view / reshape / expand whose constant sizes name the token count gets k instead."""
        found = _sizes(orig)
        if found is None or orig.args[0] not in self.env or self.k == self.n:
            return                  # k = every token: the sizes stay right (and other axes of that size are no guess)
        sizes, packed = found
        axes = self.token_axes(orig.args[0])
        if not axes and orig.args[0] in self.merged:
            j = self._split_merged(orig, sizes)
            sizes[j] = -1 if -1 not in sizes else self.k_node
            copy.args = (copy.args[0], tuple(sizes)) if packed else (copy.args[0], *sizes)
            return
        if not axes:
            return
        old_in, old_out = example_value(orig.args[0]).shape, example_value(orig).shape
        j = _output_axis(old_in, old_out, axes[0], orig.target == "expand")
        if len(axes) != 1 or j is None:
            raise ValueError(f"{orig.name} reshapes the token axis away ({tuple(old_in)} -> {tuple(old_out)})")
        if sizes[j] != -1:
            sizes[j] = -1 if -1 not in sizes else self.k_node
        copy.args = (copy.args[0], tuple(sizes)) if packed else (copy.args[0], *sizes)

    def _split_merged(self, orig: fx.Node, sizes: list) -> int:
        """The output dim of a reshape that splits a merged [outer x tokens] axis into (outer..., tokens)."""
        axis, outer = self.merged[orig.args[0]]
        old_in = example_value(orig.args[0]).shape
        before = 1
        for d in old_in[:axis]:
            before *= d
        acc, j = 1, 0
        while j < len(sizes) and acc < before:
            acc *= sizes[j]
            j += 1
        split = 1
        while j < len(sizes) and acc == before and split < outer:
            split *= sizes[j]
            j += 1
        if acc != before or split != outer or j >= len(sizes) or sizes[j] != self.n:
            raise ValueError(f"{orig.name} reshapes a merged token axis in a way duca cannot follow "
                             f"({tuple(old_in)} -> {tuple(sizes)})")
        return j

    def copy(self, region: list[fx.Node]) -> dict[fx.Node, fx.Node]:
        for n in region:
            outside = {a: self.outside_operand(n, a) for a in n.all_input_nodes if a not in self.env}
            self.env[n] = self.graph.node_copy(n, lambda a: self.env.get(a, outside.get(a, a)))
            if not self.retarget_exchange(n, self.env[n]):
                self.retarget_sizes(n, self.env[n])
            _evaluate(self.env[n])
            self.track_merged(n)
        return self.env

    # -- context parallelism: Ulysses' all-to-all inside a branch (LTX's cross-attention) ----------
    def retarget_exchange(self, orig: fx.Node, copy: fx.Node) -> bool:
        """diffusers' exchange is ``flatten() -> all_to_all_single (equal splits) -> wait -> reshape
        to the flattened shape``. On k tokens the splits are the copy's numel / world and the
        reshape takes the copied shape back (the token axis is where it was). The splits are read
        off the tensor at run time: the graph names no literal k, so one variant serves every k."""
        if is_collective(orig, "all_to_all_single"):
            outs, ins = orig.args[1], orig.args[2]
            if not isinstance(outs, (list, tuple)) or len(set(outs)) != 1 or list(outs) != list(ins):
                raise ValueError(f"{orig.name}: an all-to-all with unequal splits {outs} cannot run on k tokens")
            with self.graph.inserting_before(copy):
                numel = self.graph.call_method("numel", (copy.args[0],))
                _evaluate(numel)
                part = self.graph.call_function(operator.floordiv, (numel, len(outs)))
                _evaluate(part)
            copy.args = (copy.args[0], [part] * len(outs), [part] * len(ins), *orig.args[3:])
            return True
        flat = _exchanged(orig)
        if flat is None or flat.args[0] not in self.env:
            return False
        shape = list(example_value(self.env[flat.args[0]]).shape)
        axes = self.token_axes(flat.args[0])
        if len(axes) != 1:
            raise ValueError(f"{orig.name}: the token axis of an exchanged tensor is not known ({tuple(shape)})")
        shape[axes[0]] = -1
        copy.args = (copy.args[0], tuple(shape))
        return True

    def track_merged(self, orig: fx.Node) -> None:
        """Follow a token axis merged with the ranks' axis (``flatten(x, 0, 1)`` of [world, k, ...])
        through permutes and attention, to the reshape that splits it again."""
        src = orig.args[0] if orig.args and isinstance(orig.args[0], fx.Node) else None
        if orig.op == "call_method" and orig.target == "flatten" and src in self.env and len(orig.args) == 3:
            ndim = example_value(src).ndim
            start, end = orig.args[1] % ndim, orig.args[2] % ndim
            axes = self.token_axes(src)
            if len(axes) == 1 and start <= axes[0] <= end and axes[0] == end:
                outer = 1
                for d in range(start, end):
                    outer *= example_value(src).shape[d]
                if outer > 1:
                    self.merged[orig] = (start, outer)
        elif src in self.merged:
            axis, outer = self.merged[src]
            if orig.op == "call_method" and orig.target in ("contiguous", "clone", "to"):
                self.merged[orig] = (axis, outer)
            elif orig.op == "call_method" and orig.target == "permute":
                dims = list(orig.args[1]) if isinstance(orig.args[1], (tuple, list)) else list(orig.args[1:])
                self.merged[orig] = (dims.index(axis), outer)
        elif is_sdpa(orig):
            query = orig.args[0] if orig.args else orig.kwargs.get("query")
            if query in self.merged and self.merged[query][0] == 2:
                self.merged[orig] = self.merged[query]


def copy_on_tokens(graph: fx.Graph, raw: fx.Node, source: fx.Node, idx: fx.Node,
                   cached: dict[fx.Node, fx.Node] | None = None) -> tuple[fx.Node, dict]:
    """Copy the region ``source -> raw`` onto the tokens ``idx`` selects; (fresh rows, node map).
    ``cached`` maps region nodes (a parallel block's attention half) to caches of their value: their
    rows are gathered from the cache, and what only they needed is not copied."""
    copier = _TokenCopy(graph, source, idx)
    for node, cache in (cached or {}).items():
        copier.env[node] = copier.gather(cache, 1)
    env = copier.copy(_needed(branch_region(raw, source), raw, set(cached or ())))
    want = [copier.batch, copier.k, *example_value(raw).shape[2:]]
    if list(example_value(env[raw]).shape) != want:
        raise ValueError(f"the copy on k tokens gives {tuple(example_value(env[raw]).shape)}, not {tuple(want)}")
    return env[raw], env


def _needed(region: list[fx.Node], raw: fx.Node, cached: set) -> list[fx.Node]:
    """The nodes of ``region`` that ``raw`` reads other than through ``cached`` nodes."""
    inside, keep, todo = set(region), set(), [raw]
    while todo:
        n = todo.pop()
        if n in keep or n in cached or n not in inside:
            continue
        keep.add(n)
        todo.extend(n.all_input_nodes)
    return [n for n in region if n in keep]
