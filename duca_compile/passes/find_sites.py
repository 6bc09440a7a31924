"""Find cache sites — residual branches of transformer blocks — in a Dynamo FX graph.

Only generic structure is used: ``nn_module_stack`` says which block and which child module a node
belongs to, and a block-level ``add`` whose one operand comes from a single (non-norm) child module
and whose other operand comes from no child is a residual add. The node first reached in that
child is the branch's raw, un-gated output: REUSE reads it from a cache and re-applies the current
step's gate, as the official DuCa code does.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

__all__ = ["Site", "SiteMap", "find_sites", "module_path", "block_path", "ancestors_in_block", "is_sdpa"]

_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, "add", "add_"}
_SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention,
                 torch.ops.aten.scaled_dot_product_attention.default}
_NORM_NAME = re.compile(r"norm", re.IGNORECASE)
_BLOCK_PREFIX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


@dataclass
class Site:
    """One residual branch of one block."""

    name: str              # module path of the child holding the raw output, e.g. "transformer_blocks.0.ff"
    block: str             # e.g. "transformer_blocks.0"
    kind: str              # "self_attn" | "cross_attn" | "ff"
    outputs: list[str]     # raw (pre-gate) output node names; Flux joint attention has two
    streams: list[str]     # residual-stream node entering the branch, one per output
    tokens: list[int]      # token count (dim 1) of each output
    subset_reason: str = ""  # why SUBSET cannot compute this site token-wise ("" = it can)
    layer: int = 0           # index of ``block`` in the stack, in graph order

    @property
    def subsettable(self) -> bool:
        return not self.subset_reason


@dataclass
class SiteMap:
    sites: list[Site] = field(default_factory=list)
    stack_outputs: list[str] = field(default_factory=list)  # hidden state(s) leaving the block stack
    blocks: list[str] = field(default_factory=list)
    why_empty: str = ""

    def __bool__(self) -> bool:
        return bool(self.sites) and bool(self.stack_outputs)


def _normalize(raw: str) -> str:
    raw = raw.replace("L['self']", "").replace("L['fn']", "")
    raw = re.sub(r"(?:\.?__dict__)?\['_modules'\]\['([^']+)'\]", r".\1", raw)
    raw = re.sub(r"\._modules\['([^']+)'\]", r".\1", raw)
    raw = re.sub(r"\[(\d+)\]", r".\1", raw)
    raw = re.sub(r"\['([^']+)'\]", r".\1", raw)
    return re.sub(r"\.+", ".", raw).strip(".")


def module_path(node: fx.Node) -> str:
    """Normalised module path of the innermost module that produced ``node`` ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return _normalize(list(stack.values())[-1][0]) if stack else ""


def block_path(node: fx.Node) -> str | None:
    """The block (``<name>.<index>``) a node belongs to, or None outside every block."""
    m = _BLOCK_PREFIX.match(module_path(node)) if node.op != "output" else None
    return m.group(1) if m else None


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SDPA_TARGETS


def ancestors_in_block(node: fx.Node, stop: fx.Node, block: str) -> list[fx.Node]:
    """Nodes of ``block`` that ``node`` depends on without passing through ``stop``."""
    out, todo = {}, [node]
    while todo:
        n = todo.pop()
        if n in out or n is stop or block_path(n) != block:
            continue
        out[n] = None
        todo.extend(n.all_input_nodes)
    return list(out)


def _child_class(node: fx.Node, child_path: str) -> str:
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        if _normalize(path) == child_path:
            return getattr(cls, "__name__", str(cls))
    return ""


class _Where:
    """Block / child-module lookup for every node of a graph, computed once."""

    def __init__(self, graph: fx.Graph):
        self.block: dict[fx.Node, str | None] = {}
        self.child: dict[fx.Node, str | None] = {}
        self.norm_child: dict[fx.Node, bool] = {}
        for n in graph.nodes:
            path = module_path(n) if n.op in ("call_function", "call_method", "call_module") else ""
            m = _BLOCK_PREFIX.match(path)
            self.block[n] = m.group(1) if m else None
            rest = path[len(m.group(1)) + 1:] if m and len(path) > len(m.group(1)) else ""
            self.child[n] = rest.split(".")[0] if rest else None
            self.norm_child[n] = bool(self.child[n]) and (
                bool(_NORM_NAME.search(self.child[n])) or "Norm" in _child_class(n, f"{m.group(1)}.{self.child[n]}"))


def _is_add(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and n.target in _ADD_TARGETS and len(n.args) >= 2 \
        and all(isinstance(a, fx.Node) for a in n.args[:2])


def _reach_children(start: fx.Node, block: str, where: _Where) -> dict[str, fx.Node]:
    """Non-norm child modules reached walking back from ``start`` through block-level non-add nodes."""
    found: dict[str, fx.Node] = {}
    todo, seen = [start], set()
    while todo:
        n = todo.pop()
        if n in seen or where.block.get(n) != block:
            continue
        seen.add(n)
        child = where.child[n]
        if child is not None:
            if not where.norm_child[n]:
                found.setdefault(child, n)
            continue
        if _is_add(n):
            continue  # an earlier residual: the stream, not this branch
        todo.extend(a for a in n.all_input_nodes)
    return found


def _ancestors(node: fx.Node, stop: set[fx.Node], block: str, where: _Where) -> set[fx.Node]:
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in out or n in stop or where.block.get(n) != block:
            continue
        out.add(n)
        todo.extend(n.all_input_nodes)
    return out


def _classify(raw: fx.Node, stream: fx.Node, block: str, where: _Where) -> str:
    region = _ancestors(raw, {stream}, block, where)
    attn = [n for n in region if n.op == "call_function" and n.target in _SDPA_TARGETS]
    if not attn:
        # An attention module without SDPA (Sana's linear attention, a bmm/softmax processor) still
        # mixes tokens: call it self-attention, so SUBSET reuses it instead of computing k tokens.
        cls = _child_class(raw, f"{block}.{where.child[raw]}")
        return "self_attn" if "Attention" in cls else "ff"
    for sdpa in attn:
        key = sdpa.args[1] if len(sdpa.args) > 1 else sdpa.kwargs.get("key")
        if isinstance(key, fx.Node) and _reaches(key, stream):
            return "self_attn"
    return "cross_attn"


def _reaches(node: fx.Node, target: fx.Node) -> bool:
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _branch_input(operand: fx.Node, raw: fx.Node) -> fx.Node:
    """The residual stream as the branch reads it. The add's operand may be a cast of it (Wan adds
    ``hidden.float()``), so walk back through single-input nodes to a value the branch depends on."""
    node = operand
    for _ in range(8):
        if _reaches(raw, node):
            return node
        if len(node.all_input_nodes) != 1:
            break
        node = node.all_input_nodes[0]
    return operand


def _token_count(n: fx.Node) -> int | None:
    val = n.meta.get("example_value")
    if isinstance(val, torch.Tensor) and val.ndim == 3 and isinstance(val.shape[1], int):
        return int(val.shape[1])
    return None


def find_sites(gm: fx.GraphModule) -> SiteMap:
    """Locate every block's residual branches and the stack output in ``gm``."""
    graph = gm.graph
    where = _Where(graph)
    sites: dict[str, Site] = {}
    residual_adds: list[fx.Node] = []
    for n in graph.nodes:
        block = where.block.get(n)
        if block is None or where.child[n] is not None or not _is_add(n):
            continue
        a, b = n.args[0], n.args[1]
        reach_a, reach_b = _reach_children(a, block, where), _reach_children(b, block, where)
        if len(reach_a) == 1 and not reach_b:
            (child, raw), stream = next(iter(reach_a.items())), b
        elif len(reach_b) == 1 and not reach_a:
            (child, raw), stream = next(iter(reach_b.items())), a
        else:
            continue
        residual_adds.append(n)
        stream = _branch_input(stream, raw)
        name = f"{block}.{child}"
        site = sites.get(name)
        if site is None:
            site = sites[name] = Site(name=name, block=block, kind=_classify(raw, stream, block, where),
                                      outputs=[], streams=[], tokens=[])
        if raw.name not in site.outputs:
            site.outputs.append(raw.name)
            site.streams.append(stream.name)
            site.tokens.append(_token_count(raw) or -1)

    for site in sites.values():
        site.subset_reason = _subset_reason(site, graph)

    # Stack outputs: block nodes downstream of a residual add that feed something outside the blocks.
    downstream: set[fx.Node] = set()
    for n in graph.nodes:
        if n in residual_adds or any(a in downstream for a in n.all_input_nodes):
            downstream.add(n)
    stack_outputs = [n.name for n in graph.nodes
                     if n in downstream and where.block.get(n) is not None
                     and any(where.block.get(u) is None for u in n.users)]

    blocks = list(dict.fromkeys(s.block for s in sites.values()))
    for site in sites.values():
        site.layer = blocks.index(site.block)
    result = SiteMap(sites=list(sites.values()), stack_outputs=stack_outputs, blocks=blocks)
    if not sites:
        result.why_empty = ("no residual branch found: no block-level add (module path '<name>.<index>') "
                            "combines one child module's output with the residual stream")
    elif not stack_outputs:
        result.why_empty = "no hidden state leaves the block stack (is every block inside this graph?)"
    return result


def _subset_reason(site: Site, graph: fx.Graph) -> str:
    if site.kind == "self_attn":
        return "self-attention mixes all tokens; it is reused on SUBSET steps"
    if len(site.outputs) != 1:
        return "branch has several outputs"
    nodes = {n.name: n for n in graph.nodes}
    raw, stream = nodes[site.outputs[0]], nodes[site.streams[0]]
    if not _reaches(raw, stream):
        return "the branch does not read the residual stream it is added to"
    if _token_count(raw) is None or _token_count(stream) != _token_count(raw):
        return "branch input and output are not [batch, tokens, channels] with the same token count"
    return ""
