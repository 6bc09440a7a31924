"""SUBSET(k): compute a branch for k selected tokens per sample and scatter them into its cache.

The branch region is every node between the branch's input (the residual stream, or the branch
module's own input when that carries other tokens) and the raw output. It is copied with the
input replaced by ``gather(input, idx)``. Operands that do not depend on the input (weights, gates,
text K/V of cross-attention) are shared unchanged, except those that broadcast along the token
axis: rotary tables, per-token modulation, query-shaped masks are gathered with the same indices.
The token axis of every copied node is read off its fake value (N tokens became k). The raw
output's users then read the cache after an in-place ``scatter_`` of the k fresh rows. With ClusCa
propagation every cached row first moves towards its cluster representative's fresh row; with
Taylor orders the users read the forecast built on the updated order-0 term.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .find_sites import SiteMap
from .graph_paths import branch_region, graph_fake_mode, is_sdpa
from .layout import VariantContext, order_key
from .taylor_terms import forecast

__all__ = ["subset_branches", "copy_on_tokens", "probe_subsets"]

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


def _value(n):
    return n.meta.get("example_value") if isinstance(n, fx.Node) else n


def _evaluate(node: fx.Node) -> None:
    """Set ``node``'s fake value from its inputs' (Dynamo-level targets: functions and methods)."""
    args = fx.node.map_arg(node.args, _value)
    kwargs = fx.node.map_arg(node.kwargs, _value)
    fake_mode = graph_fake_mode(_value(a) for a in node.all_input_nodes)
    with fake_mode if fake_mode is not None else torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
    node.meta["example_value"] = value


def _emit(graph: fx.Graph, target, args: tuple) -> fx.Node:
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
        self.batch, self.k = _value(idx).shape
        self.n = _value(source).shape[1]
        self.env: dict[fx.Node, fx.Node] = {source: self.gather(source, 1)}
        self.gathered: dict[tuple, fx.Node] = {}
        # k read off the index at run time, for a size list that already holds a -1 (dead code if none)
        self.k_node = graph.call_method("size", (idx, 1))
        self.k_node.meta["example_value"] = self.k

    def gather(self, x: fx.Node, axis: int, ndim: int | None = None) -> fx.Node:
        """``x`` gathered along ``axis`` with the per-sample indices; a value without a batch axis is
        first given one (left-padded to ``ndim`` dims, batch expanded)."""
        g, shape = self.graph, list(_value(x).shape)
        ndim = ndim or len(shape)
        if len(shape) < ndim or shape[0] != self.batch:
            shape = [1] * (ndim - len(shape)) + shape
            x = _emit(g, aten.view.default, (x, shape))
            shape[0] = self.batch
            x = _emit(g, aten.expand.default, (x, list(shape)))
        view = [self.batch] + [1] * (ndim - 1)
        view[axis] = -1                 # no literal k: one compiled variant serves every k
        index = _emit(g, aten.view.default, (self.idx, view))
        shape[axis] = -1
        index = _emit(g, aten.expand.default, (index, shape))
        return _emit(g, aten.gather.default, (x, axis, index))

    def token_axes(self, orig: fx.Node) -> list[int]:
        old, new = _value(orig), _value(self.env[orig])
        if not isinstance(old, torch.Tensor) or old.ndim != new.ndim:
            return []
        return [d for d in range(old.ndim) if old.shape[d] == self.n and new.shape[d] == self.k]

    def outside_operand(self, node: fx.Node, x: fx.Node) -> fx.Node:
        """``x`` as ``node``'s copy must read it: gathered if it broadcasts along a token axis."""
        val = _value(x)
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
            ndim = _value(y).ndim
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
        if not axes:
            return
        old_in, old_out = _value(orig.args[0]).shape, _value(orig).shape
        j = _output_axis(old_in, old_out, axes[0], orig.target == "expand")
        if len(axes) != 1 or j is None:
            raise ValueError(f"{orig.name} reshapes the token axis away ({tuple(old_in)} -> {tuple(old_out)})")
        if sizes[j] != -1:
            sizes[j] = -1 if -1 not in sizes else self.k_node
        copy.args = (copy.args[0], tuple(sizes)) if packed else (copy.args[0], *sizes)

    def copy(self, region: list[fx.Node]) -> dict[fx.Node, fx.Node]:
        for n in region:
            outside = {a: self.outside_operand(n, a) for a in n.all_input_nodes if a not in self.env}
            self.env[n] = self.graph.node_copy(n, lambda a: self.env.get(a, outside.get(a, a)))
            self.retarget_sizes(n, self.env[n])
            _evaluate(self.env[n])
        return self.env


def copy_on_tokens(graph: fx.Graph, raw: fx.Node, source: fx.Node, idx: fx.Node) -> tuple[fx.Node, dict]:
    """Copy the region ``source -> raw`` onto the tokens ``idx`` selects; (fresh rows, node map)."""
    copier = _TokenCopy(graph, source, idx)
    env = copier.copy(branch_region(raw, source))
    want = [copier.batch, copier.k, *_value(raw).shape[2:]]
    if list(_value(env[raw]).shape) != want:
        raise ValueError(f"the copy on k tokens gives {tuple(_value(env[raw]).shape)}, not {tuple(want)}")
    return env[raw], env


def _expanded_index(graph: fx.Graph, idx: fx.Node, channels: int) -> fx.Node:
    return _emit(graph, aten.expand.default, (_emit(graph, aten.unsqueeze.default, (idx, -1)), [-1, -1, channels]))


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
        tokens, batch = site.tokens[0], int(_value(raw).shape[0])
        with graph.inserting_before(anchor):
            idx = graph.placeholder(f"probe_{len(graph.nodes)}")
        with graph_fake_mode([_value(raw)]):
            # on the graph's device: a CPU index against CUDA (or meta) values fails every probe
            idx.meta["example_value"] = torch.empty(batch, max(tokens // 2, 1), dtype=torch.int64,
                                                    device=_value(raw).device)
        try:
            with graph.inserting_before(raw.next):
                copy_on_tokens(graph, raw, source, idx)
        except Exception as e:  # noqa: BLE001 - any failure means "not token-wise here"
            site.subset_reason = f"the branch does not run on a subset of tokens ({type(e).__name__}: {e})"[:200]
