"""Find cache sites — residual branches of transformer blocks — in a Dynamo FX graph.

Only generic structure is used: ``nn_module_stack`` says which block and which child module a node
belongs to, and a block-level ``add`` whose one operand comes from a single (non-norm) child module
and whose other operand comes from no child is a residual add. The node first reached in that
child is the branch's raw, un-gated output: REUSE reads it from a cache and re-applies the current
step's gate (and any norm wrapped around the output, Lumina2's sandwich norm), as the official
DuCa code does. Children that do not read the stream (QwenImage's ``img_mod`` modulation) are
conditioning, not branches. Block stacks that never see the latent (a text refiner) are not cached,
and neither are blocks without an attention module of their own: a transformer block owns its
attention (``blocks.3.attn1``), while a UNet's resnets and bare attention layers, which also add a
residual, are no stack of transformer blocks.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph_paths import (ONE_BLOCK, SDPA_TARGETS, ancestors_in_block, as_one_block, block_path, branch_region,
                          child_class, is_sdpa, module_path, reaches, source_name, split_block, token_count)

__all__ = ["Site", "SiteMap", "find_sites", "module_path", "block_path", "ancestors_in_block", "is_sdpa",
           "branch_region", "source_name"]

_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, "add", "add_"}
_CONV_TARGETS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d,
                 torch.nn.functional.conv2d, torch.nn.functional.conv3d}
_NORM_NAME = re.compile(r"norm", re.IGNORECASE)
LATENT_INPUT = re.compile(r"\['hidden_states'\]")


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
    subset_input: str = ""   # node gathered on SUBSET steps: the stream, or the branch module's input
    #                          when the stream has other tokens (CogVideoX's FF runs on text + video)
    attention_half: str = ""   # a parallel block's attention output (Flux single blocks): cached on
    #                            FULL, its rows read back on SUBSET while the token-wise half computes
    attention_channels: tuple = ()   # (start, stop) of that half in the branch module's input
    residual: str = ""       # the residual add of output 0: the stream after this branch
    latent: bool = True      # the stream carries the latent input other than through attention
    #                          (False: joint attention's text stream, which sees the image only there)

    @property
    def subsettable(self) -> bool:
        return not self.subset_reason

    @property
    def parallel_subset(self) -> bool:
        """A parallel block that runs its token-wise half on k tokens: its attention half is cached."""
        return bool(self.attention_half) and self.subsettable


@dataclass
class SiteMap:
    sites: list[Site] = field(default_factory=list)
    stack_outputs: list[str] = field(default_factory=list)  # hidden state(s) leaving the block stack
    blocks: list[str] = field(default_factory=list)
    why_empty: str = ""
    regional: bool = False   # the graph is one block (regional compilation): its one block is ONE_BLOCK

    def __bool__(self) -> bool:
        return bool(self.sites) and bool(self.stack_outputs)


class _Where:
    """Block / child-module lookup for every node of a graph, computed once."""

    def __init__(self, graph: fx.Graph):
        self.block: dict[fx.Node, str | None] = {}
        self.child: dict[fx.Node, str | None] = {}
        self.norm_child: dict[fx.Node, bool] = {}
        for n in graph.nodes:
            path = module_path(n) if n.op in ("call_function", "call_method", "call_module") else ""
            self.block[n], self.child[n] = split_block(path)
            child = self.child[n]
            self.norm_child[n] = bool(child) and (
                bool(_NORM_NAME.search(child)) or "Norm" in child_class(n, f"{self.block[n]}.{child}"))

    def nodes_of(self, block: str) -> set[fx.Node]:
        return {n for n, b in self.block.items() if b == block}


def _is_add(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and n.target in _ADD_TARGETS and len(n.args) >= 2 \
        and all(isinstance(a, fx.Node) for a in n.args[:2])


def _reach_children(start: fx.Node, block: str, where: _Where) -> dict[str, fx.Node]:
    """Non-norm child modules reached walking back from ``start`` through block-level non-add nodes
    and through norm children (a norm wrapped around a branch output is re-applied on REUSE)."""
    found: dict[str, fx.Node] = {}
    todo, seen = [start], set()
    while todo:
        n = todo.pop()
        if n in seen or where.block.get(n) != block:
            continue
        seen.add(n)
        child = where.child[n]
        if child is not None and not where.norm_child[n]:
            found.setdefault(child, n)
            continue
        if child is None and _is_add(n):
            continue  # an earlier residual: the stream, not this branch
        todo.extend(n.all_input_nodes)
    return found


def _cast_chain(node: fx.Node) -> set[fx.Node]:
    """``node`` and the single-input nodes behind it (Wan adds ``hidden.float()``, a cast of the stream)."""
    chain = {node}
    for _ in range(8):
        if len(node.all_input_nodes) != 1:
            break
        node = node.all_input_nodes[0]
        chain.add(node)
    return chain


def _branch_input(operand: fx.Node, raw: fx.Node) -> fx.Node:
    """The residual stream as the branch reads it: ``operand`` or the first node behind it the branch reads."""
    node = operand
    for _ in range(8):
        if reaches(raw, node):
            return node
        if len(node.all_input_nodes) != 1:
            break
        node = node.all_input_nodes[0]
    return operand


def _residual(n: fx.Node, block: str, where: _Where, block_nodes: set) -> tuple[str, fx.Node, fx.Node] | None:
    """(child, raw output, stream operand) if ``n`` adds one child's branch to the residual stream.
    The stream may itself come from a child (HunyuanDiT's long-skip ``skip_linear``) when the branch
    reads it; modulation children (gates computed from the timestep) do not read the stream."""
    a, b = n.args[0], n.args[1]
    reach_a, reach_b = _reach_children(a, block, where), _reach_children(b, block, where)
    for delta, stream, other in ((reach_a, b, reach_b), (reach_b, a, reach_a)):
        if not delta:
            continue
        chain = _cast_chain(stream)
        if len(delta) > 1:
            delta = {c: r for c, r in delta.items() if reaches(r, chain, within=block_nodes | chain)}
        if len(delta) != 1:
            continue
        (child, raw), = delta.items()
        if child not in other and all(reaches(raw, {o}, within=block_nodes | {o}) for o in other.values()):
            return child, raw, stream
    return None


def _latest_state(stream: fx.Node, raw: fx.Node, residual_adds: list[fx.Node]) -> fx.Node:
    """The latest residual state the branch reads: AuraFlow adds its FF to the block input but feeds
    it ``norm2(input + attention)``, so the FF's own input is the attention's residual add."""
    inside = [n for n in branch_region(raw, stream) if n in residual_adds]
    return inside[-1] if inside else stream


def _latent_blocks(graph: fx.Graph, where: _Where) -> set[str] | None:
    """Blocks that depend on the ``hidden_states`` input (None when no input has that name)."""
    latent = [n for n in graph.nodes if n.op == "placeholder" and LATENT_INPUT.search(source_name(n))]
    if not latent:
        return None
    dependent, blocks = set(latent), set()
    for n in graph.nodes:
        if n.op != "placeholder" and any(a in dependent for a in n.all_input_nodes):
            dependent.add(n)
            if where.block.get(n) is not None:
                blocks.add(where.block[n])
    return blocks


def _direct_latent_nodes(graph: fx.Graph) -> set[fx.Node] | None:
    """Nodes that depend on the ``hidden_states`` input other than through an attention (SDPA)
    output; None when no input has that name."""
    latent = [n for n in graph.nodes if n.op == "placeholder" and LATENT_INPUT.search(source_name(n))]
    if not latent:
        return None
    dependent = set(latent)
    for n in graph.nodes:
        if n.op != "placeholder" and any(a in dependent and not is_sdpa(a) for a in n.all_input_nodes):
            dependent.add(n)
    return dependent


def _classify(raw: fx.Node, stream: fx.Node, block: str, where: _Where) -> str:
    region = branch_region(raw, stream)
    attn = [n for n in region if n.op == "call_function" and n.target in SDPA_TARGETS]
    if not attn:
        # An attention module without SDPA (Sana's linear attention, a bmm/softmax processor) still
        # mixes tokens: call it self-attention, so SUBSET reuses it instead of computing k tokens.
        cls = child_class(raw, f"{block}.{where.child[raw]}")
        return "self_attn" if "Attention" in cls else "ff"
    for sdpa in attn:
        key = sdpa.args[1] if len(sdpa.args) > 1 else sdpa.kwargs.get("key")
        if isinstance(key, fx.Node) and reaches(key, stream):
            return "self_attn"
    return "cross_attn"


def _attention_blocks(graph: fx.Graph, where: _Where) -> set[str]:
    """Blocks with an attention child module: one whose own code runs SDPA, or whose class is an
    attention class (Sana's linear attention runs no SDPA)."""
    out = set()
    for n in graph.nodes:
        block, child = where.block.get(n), where.child.get(n)
        if block is None or child is None or block in out or module_path(n) != f"{block}.{child}":
            continue
        if is_sdpa(n) or "Attention" in child_class(n, f"{block}.{child}"):
            out.add(block)
    return out


def find_sites(gm: fx.GraphModule, block_class: type | None = None) -> SiteMap:
    """Locate every block's residual branches and the stack output in ``gm``. A graph with no
    stack of blocks whose root is itself a block (``compile_repeated_blocks``, or ``torch.compile``
    of one block) is read as a stack of one block, ``ONE_BLOCK``; its module paths are rewritten
    so (``block_class``: the block's class, for the metadata)."""
    found = _find_sites(gm)
    reason = getattr(gm, "compile_subgraph_reason", None)
    if found or getattr(reason, "graph_break", False):
        return found          # a graph that ends at a graph break is no whole block: its output is not the block's
    undo = as_one_block(gm, block_class)
    one = _find_sites(gm)
    if one and one.blocks == [ONE_BLOCK]:
        one.regional = True
        return one
    undo()
    return found


def _find_sites(gm: fx.GraphModule) -> SiteMap:
    graph = gm.graph
    where = _Where(graph)
    latent_blocks = _latent_blocks(graph, where)
    found, block_nodes = [], {}
    for n in graph.nodes:
        block = where.block.get(n)
        if block is None or where.child[n] is not None or not _is_add(n):
            continue
        if latent_blocks is not None and block not in latent_blocks:
            continue
        if block not in block_nodes:
            block_nodes[block] = where.nodes_of(block)
        residual = _residual(n, block, where, block_nodes[block])
        if residual is not None:
            found.append((n, block, *residual))
    attention = _attention_blocks(graph, where)
    not_transformer = list(dict.fromkeys(block for _, block, *_ in found if block not in attention))
    found = [f for f in found if f[1] in attention]
    residual_adds = {n: None for n, *_ in found}

    direct = _direct_latent_nodes(graph)
    sites: dict[str, Site] = {}
    for add, block, child, raw, stream in found:
        stream = _latest_state(_branch_input(stream, raw), raw, residual_adds)
        name = f"{block}.{child}"
        site = sites.get(name)
        if site is None:
            site = sites[name] = Site(name=name, block=block, kind=_classify(raw, stream, block, where),
                                      outputs=[], streams=[], tokens=[], residual=add.name,
                                      latent=direct is None or stream in direct)
        if raw.name not in site.outputs:
            site.outputs.append(raw.name)
            site.streams.append(stream.name)
            site.tokens.append(token_count(raw) or token_count(stream) or -1)

    nodes = {n.name: n for n in graph.nodes}
    for site in sites.values():
        site.subset_reason, site.subset_input = _subset_input(site, nodes, where)

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
    if not sites and not_transformer:
        result.why_empty = (f"no stack of transformer blocks: {', '.join(not_transformer[:4])}"
                            f"{' ...' if len(not_transformer) > 4 else ''} add residual branches but own no "
                            "attention module (a UNet's resnets and attention layers are not cached)")
    elif not sites:
        result.why_empty = ("no residual branch found: no block-level add (module path '<name>.<index>') "
                            "combines one child module's output with the residual stream")
    elif not stack_outputs:
        result.why_empty = "no hidden state leaves the block stack (is every block inside this graph?)"
    return result


def _subset_input(site: Site, nodes: dict[str, fx.Node], where: _Where) -> tuple[str, str]:
    """(why SUBSET cannot compute this site token-wise or "", the node to gather the tokens from)."""
    if len(site.outputs) != 1:
        return "branch has several outputs" if site.kind != "self_attn" else _SELF_ATTENTION, ""
    raw, stream = nodes[site.outputs[0]], nodes[site.streams[0]]
    if site.kind == "self_attn":
        half = _attention_half(raw, stream, where)
        if half is None:
            return _SELF_ATTENTION, ""
        site.attention_half, site.attention_channels = half[0].name, half[1]
    if not reaches(raw, stream):
        return "the branch does not read the residual stream it is added to", ""
    tokens = token_count(raw)
    if tokens is None:
        return "the branch output is not [batch, tokens, channels]", ""
    source = stream
    if token_count(stream) != tokens:
        # the branch module's own input may carry the output's tokens (CogVideoX: text + video)
        entries = _module_entries(raw, stream, where)
        if len(entries) != 1 or token_count(entries[0]) != tokens or site.attention_half:
            return "branch input and output are not [batch, tokens, channels] with the same token count", ""
        source = entries[0]
    if any(n.op == "call_function" and n.target in _CONV_TARGETS for n in branch_region(raw, source)):
        return "the branch convolves neighbouring tokens", ""
    return "", source.name


_SELF_ATTENTION = "self-attention mixes all tokens; it is reused on SUBSET steps"
_CAT_TARGETS = {torch.cat, torch.concat, torch.ops.aten.cat.default}


def _module_entries(raw: fx.Node, stream: fx.Node, where: _Where) -> list[fx.Node]:
    """Nodes of the branch outside its module that the module reads (the module's inputs)."""
    return [n for n in branch_region(raw, stream) if where.child.get(n) != where.child[raw]
            and any(where.child.get(u) == where.child[raw] for u in n.users)]


def _attention_half(raw: fx.Node, stream: fx.Node, where: _Where) -> tuple[fx.Node, tuple[int, int]] | None:
    """A parallel block (Flux's single blocks: attention and MLP from one input, merged by one
    ``proj_out``) reads ``cat([attention, mlp], -1)`` into its branch module. Then (the attention
    part, its channel range): every SDPA of the branch is behind it, none behind the other parts,
    which are token-wise, so SUBSET can run them on k tokens next to cached attention rows."""
    entries = _module_entries(raw, stream, where)
    if len(entries) != 1 or entries[0].target not in _CAT_TARGETS or entries[0].op != "call_function":
        return None
    cat = entries[0]
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    values = [p.meta.get("example_value") if isinstance(p, fx.Node) else None for p in parts or ()]
    if not values or any(not isinstance(v, torch.Tensor) or v.ndim != 3 for v in values) or dim not in (-1, 2):
        return None
    region = set(branch_region(raw, stream))
    attention = {n for n in region if is_sdpa(n)}
    mixing = [i for i, p in enumerate(parts) if reaches(p, attention, within=region)]
    if not attention or len(mixing) != 1:
        return None
    half = parts[mixing[0]]
    if not all(reaches(half, {a}, within=region) for a in attention) or token_count(half) != token_count(raw):
        return None
    start = sum(int(v.shape[-1]) for v in values[:mixing[0]])
    return half, (start, start + int(values[mixing[0]].shape[-1]))
