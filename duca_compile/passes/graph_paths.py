"""Where a Dynamo FX node sits (block, child module) and how nodes connect, from metadata only."""
from __future__ import annotations

import inspect
import re

import torch
import torch.fx as fx

from .. import _torch

__all__ = ["module_path", "block_path", "source_name", "is_sdpa", "is_collective", "reaches", "branch_region",
           "ancestors_in_block", "token_count", "child_class", "graph_fake_mode", "timestep_input", "SDPA_TARGETS",
           "TIMESTEP_NAMES", "ONE_BLOCK", "as_one_block"]

SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention,
                torch.ops.aten.scaled_dot_product_attention.default}
_BLOCK_PREFIX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


# diffusers' hooks (context parallelism's split / gather hooks) replace a module's forward by a
# wrapper; Dynamo's paths then run through it: "blocks.0.forward.func.__closure__[0].cell_contents
# .forward.__self__.attn1" is "blocks.0.attn1", and a hooked root starts at L['function_reference'].
_HOOK_SEGMENTS = re.compile(r"\.forward\.func\.__closure__\[\d+\]\.cell_contents|\.forward\.__self__|"
                            r"^L\['function_reference'\]")


def _normalize(raw: str) -> str:
    previous = None
    while previous != raw:
        previous, raw = raw, _HOOK_SEGMENTS.sub("", raw)
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


# Regional compilation hands the backend one block's graph, whose module paths are relative to the
# block ("attn1.to_q", "" for the residual adds). Prefixing them with this name makes the graph a
# stack of one block, so every pass reads it as it reads a whole model's graph.
ONE_BLOCK = "block.0"


def as_one_block(gm: fx.GraphModule, cls: type | None = None):
    """Rewrite ``gm``'s module paths as if its root were the block ``ONE_BLOCK``; returns a
    function that undoes it (for a graph that turns out not to be a block)."""
    saved = []
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if n.op == "output" or (not stack and n.op not in ("call_function", "call_method", "call_module")):
            continue
        saved.append((n, stack))
        entries = {"__duca_block__": (ONE_BLOCK, cls or torch.nn.Module)}
        for key, (path, klass) in (stack or {}).items():
            rest = _normalize(path)
            entries[key] = (f"{ONE_BLOCK}.{rest}" if rest else ONE_BLOCK, klass)
        n.meta["nn_module_stack"] = entries

    def undo():
        for node, stack in saved:
            if stack is None:
                node.meta.pop("nn_module_stack", None)
            else:
                node.meta["nn_module_stack"] = stack
    return undo


def split_block(path: str) -> tuple[str | None, str | None]:
    """``"blocks.3.attn1.to_q"`` -> (``"blocks.3"``, ``"attn1"``); the child is None at block level."""
    m = _BLOCK_PREFIX.match(path)
    if not m:
        return None, None
    rest = path[len(m.group(1)) + 1:]
    return m.group(1), rest.split(".")[0] if rest else None


def child_class(node: fx.Node, child_path: str) -> str:
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        if _normalize(path) == child_path:
            return getattr(cls, "__name__", str(cls))
    return ""


def source_name(node: fx.Node) -> str:
    """Dynamo's name for a placeholder's source, e.g. ``L['timestep']`` (the node name if none)."""
    return _torch.source_name(node)


def is_collective(node: fx.Node, name: str = "") -> bool:
    """A functional collective (``_c10d_functional.<name>...``: all-to-all, all-gather, wait_tensor, ...)."""
    return node.op == "call_function" and str(node.target).startswith(f"_c10d_functional.{name}")


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def reaches(node: fx.Node, targets, within: set | None = None) -> bool:
    """Whether ``node`` depends on any of ``targets``; with ``within``, only walking nodes of that set."""
    targets = targets if isinstance(targets, (set, frozenset, dict)) else {targets}
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in targets:
            return True
        if n in seen or (within is not None and n not in within):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


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


def branch_region(raw: fx.Node, stream: fx.Node) -> list[fx.Node]:
    """Nodes on some path ``stream -> raw`` (stream excluded), in graph order. A branch lies inside
    its block, so the walk back from ``raw`` stays there."""
    up = sorted(ancestors_in_block(raw, stream, block_path(raw)))     # FX nodes sort in graph order
    down = {stream}
    for n in up:
        if any(a in down for a in n.all_input_nodes):
            down.add(n)
    return [n for n in up if n in down]


def token_count(n: fx.Node) -> int | None:
    """Dim 1 of a ``[batch, tokens, channels]`` value, else None."""
    val = n.meta.get("example_value")
    if isinstance(val, torch.Tensor) and val.ndim == 3 and isinstance(val.shape[1], int):
        return int(val.shape[1])
    return None


def graph_fake_mode(values):
    """The fake mode of the first fake tensor among ``values`` (Dynamo's example values carry their
    own mode, which is not the one the backend's tracing context reports)."""
    for v in values:
        if isinstance(v, _torch.FakeTensor):
            return v.fake_mode
    return None


# Forward arguments whose value marks the denoising step.
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")
_SOURCE = re.compile(r"L\['(\w+)'\](?:\[(\d+)\]|\['(\w+)'\])?")


def timestep_input(placeholders, user: list[int], module) -> int | None:
    """The graph input that is the forward's timestep argument, by name: ``L['timestep']``,
    ``L['kwargs']['timestep']``, or ``L['args'][3]`` mapped through the forward's signature (a
    decorated forward, like diffusers' Flux and SD3, hides positional names behind ``*args``)."""
    positional = []
    if module is not None:
        try:
            positional = [p.name for p in inspect.signature(module.forward).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            pass
    for i in user:
        m = _SOURCE.fullmatch(source_name(placeholders[i]))
        if m is None:
            continue
        name, index, key = m.groups()
        if index is not None:
            name = positional[int(index)] if name == "args" and int(index) < len(positional) else None
        elif key is not None:
            name = key if name == "kwargs" else None
        if name in TIMESTEP_NAMES:
            return i
    return None
