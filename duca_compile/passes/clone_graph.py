"""Copy a Dynamo GraphModule for one variant, keeping what Dynamo attached to it.

``copy.deepcopy`` drops ``placeholder._dynamo_source``, which AOTAutograd uses to find static
inputs (parameters), so copy the graph node by node and carry the Dynamo attributes over.
"""
from __future__ import annotations

import torch.fx as fx

from .. import _torch

__all__ = ["clone_graph"]


def clone_graph(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    for old, new in env.items():
        _torch.copy_node_source(old, new)
    clone = fx.GraphModule(gm, graph)
    clone.meta = dict(getattr(gm, "meta", {}))
    _torch.copy_graph_sources(gm, clone)
    return clone
