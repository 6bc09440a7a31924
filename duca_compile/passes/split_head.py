"""Adaptive caching: cut one Dynamo graph after its head blocks into a HEAD graph, which returns
what the decision needs, and two REST graphs, which compute the blocks past the head or reuse them.

The head is every node the first ``head_blocks`` blocks need (the prefix included) and the
in-place writes into them (Wan's rotary buffer). What the rest reads from it crosses in caches: the
HEAD graph ``copy_``-s each crossing tensor into one, the REST graphs read them in its place, so
the head is computed once per call. COMPUTE runs the middle and tail blocks and writes the
middle residual (the streams leaving the last middle block minus the head's, paired by shape and
then by the shortest path back); REUSE drops the middle blocks and feeds later nodes the head's
streams plus that residual. HEAD also writes its residual (latent stream out of the head minus
into block 0) and returns ``mean|r − p|`` and ``mean|p|`` against the last computed step's ``p``, in fp32.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .. import _torch
from ..policies.forecasts import next_terms
from .clone_graph import clone_graph
from .find_sites import LATENT_INPUT, SiteMap
from .graph_paths import source_name
from .graph_paths import block_path
from .remove_dead_code import _alias_groups, _mutated, remove_dead_code

__all__ = ["HeadSplit", "split_head", "build_head", "build_rest", "BlockStreams", "block_streams"]

aten = torch.ops.aten


@dataclass
class HeadSplit:
    head: list[str]                 # blocks computed at every step, before the decision
    middle: list[str]               # blocks a cached step does not run
    tail: list[str]                 # blocks computed at every step, after it
    crossing: list[str] = field(default_factory=list)    # head nodes the rest reads: one cache each
    constants: dict = field(default_factory=dict)        # head nodes the rest reads as a Python value
    residual: tuple[str, str] = ("", "")                # (latent stream out of the head, into block 0)
    pairs: list[tuple[str, str]] = field(default_factory=list)   # (stream out of the middle, head stream)
    specs: dict = field(default_factory=dict)            # node -> (shape, dtype, device) of its cache
    why: str = ""                   # why the graph cannot be split ("" = it can)

    def __bool__(self) -> bool:
        return not self.why


def _value(n: fx.Node):
    return n.meta.get("example_value")


def _spec(n: fx.Node) -> tuple:
    v = _value(n)
    return tuple(v.shape), v.dtype, v.device


def _is_tensor(n: fx.Node) -> bool:
    return isinstance(_value(n), torch.Tensor)


def _distance(src: fx.Node, dst: fx.Node) -> float:
    """Steps back from ``src`` to ``dst`` along inputs (inf if it does not depend on it)."""
    todo, seen = deque([(src, 0)]), {src}
    while todo:
        n, d = todo.popleft()
        if n is dst:
            return d
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append((a, d + 1))
    return float("inf")


def _nearest(node: fx.Node, candidates: list[fx.Node], upstream: bool) -> fx.Node | None:
    """The candidate of ``node``'s shape and dtype most directly connected to it (``upstream``:
    candidates ``node`` depends on, else ones depending on it): a residual stream reaches its own
    earlier value in a few adds, the other stream only through attention."""
    same = [c for c in candidates if _is_tensor(c) and _spec(c)[:2] == _spec(node)[:2]]
    scored = sorted(((_distance(node, c) if upstream else _distance(c, node)), i, c) for i, c in enumerate(same))
    return scored[0][2] if scored and scored[0][0] != float("inf") else None


def split_head(gm: fx.GraphModule, sitemap: SiteMap, head_blocks: int, tail_blocks: int) -> HeadSplit:
    blocks = list(sitemap.blocks)
    if head_blocks + tail_blocks >= len(blocks):
        return HeadSplit(blocks, [], [], why=f"head_blocks={head_blocks} + tail_blocks={tail_blocks} leave no block "
                                              f"to cache in a stack of {len(blocks)}")
    split = HeadSplit(blocks[:head_blocks], blocks[head_blocks:len(blocks) - tail_blocks],
                      blocks[len(blocks) - tail_blocks:])
    head_set, upto = set(split.head), set(split.head) | set(split.middle)
    nodes = list(gm.graph.nodes)
    inside = _head_nodes(gm.graph, nodes, head_set, set(split.middle))
    for n in nodes:
        if n in inside and any(u not in inside for u in n.users):
            if _is_tensor(n):
                split.crossing.append(n.name)
                split.specs[n.name] = _spec(n)
            elif isinstance(_value(n), (int, float, bool)):
                split.constants[n.name] = _value(n)
            else:
                return _refuse(split, f"the head's value {n.name} ({type(_value(n)).__name__}) is read after it "
                                      "and cannot be cached")
    crossing = [n for n in nodes if n.name in split.specs]
    head_out = [n for n in crossing if block_path(n) in head_set]
    first = next((s for s in sitemap.sites if s.block == blocks[0] and s.latent), None)
    if first is None:
        return _refuse(split, f"block {blocks[0]} has no site on the latent stream")
    into = _entering(next(n for n in nodes if n.name == first.streams[0]), blocks[0])
    out = _nearest(into, head_out, upstream=False)
    if out is None:
        return _refuse(split, f"no stream leaving {split.head[-1]} continues the latent stream entering {blocks[0]}")
    split.residual = (out.name, into.name)
    leaving = [n for n in nodes if block_path(n) in set(split.middle) and any(block_path(u) not in upto for u in n.users)]
    stray = [n.name for n in leaving if block_path(n) != split.middle[-1]]
    if stray:
        return _refuse(split, f"{block_path(next(n for n in nodes if n.name == stray[0]))} feeds a later block or "
                              "the output directly (a long skip): its value is no cached stream")
    for n in leaving:
        h = _nearest(n, head_out, upstream=True) if _is_tensor(n) else None
        if h is None:
            return _refuse(split, f"the stream {n.name} leaving {split.middle[-1]} has no counterpart of its shape "
                                  f"leaving {split.head[-1]}")
        split.pairs.append((n.name, h.name))
    return split



@dataclass
class BlockStreams:
    """How one block graph's outputs continue its inputs (regional adaptive caching): a cached
    middle block hands each input on as the output it pairs with."""

    sources: list[int] = field(default_factory=list)     # per output: the argument it continues
    names: list[str] = field(default_factory=list)       # per output: that argument's name (pairs blocks)
    latent_in: int = -1             # the ``hidden_states`` argument
    latent_out: int = -1            # the output continuing it
    why: str = ""

    def __bool__(self) -> bool:
        return not self.why


def block_streams(gm: fx.GraphModule, example_inputs) -> BlockStreams:
    """Pair each output of a block graph with the input of its shape it is most directly computed
    from (a residual stream reaches its own input in a few adds; refused on a tie or none)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n for n, x in zip(placeholders, example_inputs)
              if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) and _is_tensor(n)]
    out = gm.graph.output_node().args[0]
    streams = BlockStreams()
    for i, node in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
        if not isinstance(node, fx.Node) or not _is_tensor(node):
            return _refuse(streams, f"output {i} of the block is no tensor")
        same = [c for c in inputs if _spec(c)[:2] == _spec(node)[:2]]
        scored = sorted((_distance(node, c), j) for j, c in enumerate(same))
        if not scored or scored[0][0] == float("inf"):
            return _refuse(streams, f"output {i} of the block continues no input of its shape")
        if len(scored) > 1 and scored[1][0] == scored[0][0]:
            return _refuse(streams, f"output {i} of the block continues two inputs of its shape equally "
                                    f"({same[scored[0][1]].name}, {same[scored[1][1]].name})")
        source = same[scored[0][1]]
        streams.sources.append(placeholders.index(source))
        streams.names.append(source_name(source))
    latent = [placeholders.index(n) for n in inputs if LATENT_INPUT.search(source_name(n))]
    if len(latent) != 1 or latent[0] not in streams.sources:
        return _refuse(streams, "no output of the block continues its hidden_states input")
    streams.latent_in = latent[0]
    streams.latent_out = streams.sources.index(latent[0])
    return streams


def _head_nodes(graph: fx.Graph, nodes: list, head: set, middle: set) -> set:
    """Every node the head blocks need, with the in-place writes into those values made before the
    middle blocks (Wan fills its rotary table slice by slice) and what they need."""
    inside = _ancestors([n for n in nodes if block_path(n) in head])
    group = _alias_groups(graph)
    before = nodes[:next(i for i, n in enumerate(nodes) if block_path(n) in middle)]
    while True:
        groups = {group[n] for n in inside}
        more = [n for n in before if n not in inside and _mutated(n) is not None and group[_mutated(n)] in groups]
        if not more:
            return inside
        inside |= _ancestors(more)


def _entering(stream: fx.Node, block: str) -> fx.Node:
    """The value entering ``block`` that the latent ``stream`` inside it continues: the residual
    is taken against the block's input, as the peers do (Cosmos adds a positional embedding to it
    inside the block, before its first branch)."""
    todo, seen = deque([stream]), {stream}
    while todo:
        n = todo.popleft()
        if block_path(n) != block and _is_tensor(n) and _spec(n) == _spec(stream):
            return n
        for a in n.all_input_nodes:
            if a not in seen and (block_path(n) == block):
                seen.add(a)
                todo.append(a)
    return stream


def _refuse(split: HeadSplit, why: str) -> HeadSplit:
    split.why = why
    return split


def _ancestors(roots) -> set:
    out, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n in out or n.op == "placeholder":
            continue
        out.add(n)
        todo.extend(n.all_input_nodes)
    return out


def _placeholder(gm: fx.GraphModule, name: str, spec: tuple, fake_mode) -> fx.Node:
    graph = gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        node = graph.placeholder(name)
    _torch.set_source_name(node, name)
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}    # a cache: static, like a weight
    if fake_mode is not None:
        with fake_mode:
            node.meta["example_value"] = torch.empty(spec[0], dtype=spec[1], device=spec[2])
    return node


def _crossing_inputs(gm: fx.GraphModule, split: HeadSplit, fake_mode) -> dict[str, fx.Node]:
    return {name: _placeholder(gm, f"duca_head_{i}", split.specs[name], fake_mode)
            for i, name in enumerate(split.crossing)}


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    remove_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


def build_head(gm: fx.GraphModule, split: HeadSplit, fake_mode=None, group: str | None = None) -> fx.GraphModule:
    """Inputs: the graph's, one cache per crossing value, then the residual caches (current, previous).
    Output: ``([mean|r − p|, mean|p|],)`` in float32: their ratio is the diff. ``group``: under
    context parallelism, the process group whose ranks each hold an equal share of the tokens: both
    means are summed over it by a functional collective, so every rank returns the same pair."""
    g = clone_graph(gm)
    nodes = {n.name: n for n in g.graph.nodes}
    caches = _crossing_inputs(g, split, fake_mode)
    out_name, in_name = split.residual
    spec = split.specs[out_name]
    current = _placeholder(g, "duca_residual", spec, fake_mode)
    previous = _placeholder(g, "duca_residual_previous", spec, fake_mode)
    output = next(n for n in g.graph.nodes if n.op == "output")
    graph = g.graph
    with graph.inserting_before(output):
        for name, cache in caches.items():
            graph.call_function(aten.copy_.default, (cache, nodes[name]))
        r = graph.call_function(aten.sub.Tensor, (nodes[out_name], nodes[in_name]))
        graph.call_function(aten.copy_.default, (current, r))
        r32 = graph.call_function(aten._to_copy.default, (r,), {"dtype": torch.float32})
        p32 = graph.call_function(aten._to_copy.default, (previous,), {"dtype": torch.float32})
        change = graph.call_function(aten.mean.default, (graph.call_function(aten.abs.default, (
            graph.call_function(aten.sub.Tensor, (r32, p32)),)),))
        scale = graph.call_function(aten.mean.default, (graph.call_function(aten.abs.default, (p32,)),))
        both = graph.call_function(aten.stack.default, ([change, scale],))
        if group is not None:
            c10d = torch.ops._c10d_functional
            both = graph.call_function(c10d.wait_tensor.default, (
                graph.call_function(c10d.all_reduce.default, (both, "sum", group)),))
    output.args = ((both,),)
    return _finish(g)


def build_rest(gm: fx.GraphModule, split: HeadSplit, cached: bool, orders: int = 0, fake_mode=None,
               basis: str = "taylor") -> fx.GraphModule:
    """Inputs: the graph's, one cache per crossing value, per pair its middle residual and its
    ``orders`` finite differences, then with ``orders`` one small float32 table: REUSE's forecast
    coefficients ``[orders + 1]``, COMPUTE's difference weights ``[orders]`` (1 / steps between the
    last two computed steps, or 0 where no difference is taken). Outputs: the graph's.
    ``cached``: REUSE (middle blocks dropped), else COMPUTE (residual and differences written, as
    ``policies.forecasts.next_terms`` for ``basis``)."""
    g = clone_graph(gm)
    graph = g.graph
    nodes = {n.name: n for n in graph.nodes}
    caches = _crossing_inputs(g, split, fake_mode)
    terms = [[_placeholder(g, f"duca_middle_residual_{j}" + (f"_d{i}" if i else ""), split.specs[h], fake_mode)
              for i in range(orders + 1)] for j, (_, h) in enumerate(split.pairs)]
    table = None
    if orders:
        size = orders + 1 if cached else orders
        table = _placeholder(g, "duca_taylor", ((size,), torch.float32, split.specs[split.pairs[0][1]][2]), fake_mode)
    for name, cache in caches.items():
        nodes[name].replace_all_uses_with(cache)
    for name, value in split.constants.items():
        for user in list(nodes[name].users):
            user.replace_input_with(nodes[name], value)
    upto = set(split.head) | set(split.middle)
    output = next(n for n in graph.nodes if n.op == "output")
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for (m, h), pair in zip(split.pairs, terms):
        if cached:
            with graph.inserting_before(first):
                stream = caches[h]
                for i, term in enumerate(pair):
                    if orders:
                        term = graph.call_function(aten.mul.Tensor, (term, graph.call_function(
                            aten.select.int, (table, 0, i))))
                    stream = graph.call_function(aten.add.Tensor, (stream, term))
            nodes[m].replace_all_uses_with(stream, delete_user_cb=lambda u: block_path(u) not in upto)
        else:
            with graph.inserting_before(output):
                fresh = graph.call_function(aten.sub.Tensor, (nodes[m], caches[h]))
                # written flat: in the caches' own shape Inductor's CPU outer-loop fusion joins these
                # writes to the last norm's loops and fails (KeyError on a local buffer, torch 2.13, Flux)
                flat = [graph.call_function(aten.reshape.default, (t, [-1])) for t in pair]
                fresh = graph.call_function(aten.reshape.default, (fresh, [-1]))
                # every old term is read before any is overwritten
                new = next_terms(basis, fresh, flat, [graph.call_function(aten.select.int, (table, 0, i))
                                                      for i in range(orders)],
                                 sub=lambda a, b: graph.call_function(aten.sub.Tensor, (a, b)),
                                 mul=lambda a, b: graph.call_function(aten.mul.Tensor, (a, b)))
                for term, value in zip(flat, new):
                    graph.call_function(aten.copy_.default, (term, value))
    return _finish(g)
