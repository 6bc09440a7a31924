"""A graph Dynamo made dynamic, specialised to the concrete sizes of one call.

Without ``dynamic=False``, one change of batch size makes Dynamo trace a graph with symbolic sizes,
and that graph then serves every shape, the first one included. Caches need static shapes, so the
backend specialises such a graph per concrete shape at run time: a copy whose example values come
from running it once on the call's real inputs (each value kept as a static fake tensor, the real
one freed after its last use). Real values, not fake propagation, because Dynamo passes
unspecialised Python floats as 0-d tensors that the graph reads with ``.item()``. The ordinary static
path then finds sites in the copy and caches it like a graph Dynamo traced with static shapes.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import _torch
from .clone_graph import clone_graph

__all__ = ["specialize_shapes", "is_dynamic"]


def is_dynamic(example_inputs) -> bool:
    return any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and
                                                any(isinstance(s, torch.SymInt) for s in x.shape))
               for x in example_inputs)


class _RecordStatic(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, mode):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        n.meta["example_value"] = torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: self.mode.from_tensor(t, static_shapes=True), value)
        return value


def specialize_shapes(gm: fx.GraphModule, args) -> fx.GraphModule:
    """A copy of ``gm`` whose every ``example_value`` has the static sizes ``args`` (the real inputs
    of a call, Python ints for the symbolic sizes) give it; those inputs stay placeholders."""
    clone = clone_graph(gm)
    with torch.no_grad():
        _RecordStatic(clone, _torch.FakeTensorMode(allow_non_fake_inputs=True)).run(*args)
    return clone
