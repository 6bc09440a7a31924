"""Which model a call belongs to.

Dynamo reuses one compiled graph for every instance of a class, because parameters are graph
inputs: the graph that was compiled for ``m1`` also serves ``m2``. Caching state therefore never
belongs to a graph. It belongs to the model instance whose weights a call carries, and is found at
run time from the call's first parameter (its *anchor*). An anchor seen for the first time is tied
to the innermost module on the call stack that holds it (the module Dynamo is running, matched by
identity), so every graph piece of one model call (graph breaks) finds the same owner.

An ``Owner`` keeps one state per backend setting: one module compiled twice with two configs (an
A/B test) has two independent states.
"""
from __future__ import annotations

import sys
import weakref

import torch

__all__ = ["Owner", "lookup", "owner_of_module", "owner_of_call", "calling_module", "modules_on_stack"]

# id(anchor parameter or module) -> (weak reference to it, its Owner). Tensors compare elementwise,
# so no WeakKeyDictionary; an entry leaves with the object it names.
_OWNERS: dict[int, tuple[weakref.ref, "Owner"]] = {}
_STACK_DEPTH = 64          # frames searched for the module running a call


class Owner:
    """One model instance: its states, keyed by backend settings (see ``backend.Settings``)."""

    def __init__(self, module: torch.nn.Module | None = None):
        self.module = weakref.ref(module) if module is not None else None
        self.states: dict = {}
        self.clock_hook = None      # regional compilation: the forward pre-hook marking each model call

    def __repr__(self):
        module = self.module() if self.module is not None else None
        return f"Owner({type(module).__name__ if module is not None else 'anonymous'}, {len(self.states)} states)"


def lookup(obj) -> Owner | None:
    entry = _OWNERS.get(id(obj))
    return entry[1] if entry is not None and entry[0]() is obj else None


def _register(obj, owner: Owner) -> Owner:
    key = id(obj)
    _OWNERS[key] = (weakref.ref(obj, lambda _, key=key: _OWNERS.pop(key, None)), owner)
    return owner


def owner_of_module(module: torch.nn.Module) -> Owner:
    return lookup(module) or _register(module, Owner(module))


def tie(anchor: torch.Tensor, module: torch.nn.Module | None) -> Owner:
    """Tie ``anchor`` to ``module``'s owner (or to an owner of its own when no module is known)."""
    owner = owner_of_module(module) if module is not None else Owner()
    return _register(anchor, owner)


def owner_of_call(anchor: torch.Tensor) -> Owner:
    """The owner of a call whose first parameter is ``anchor``."""
    return lookup(anchor) or tie(anchor, calling_module(anchor))


def calling_module(anchor: torch.Tensor) -> torch.nn.Module | None:
    """The innermost module on the call stack that holds ``anchor`` as a parameter (the module whose
    forward Dynamo's compiled code is running), or None."""
    frame = sys._getframe(1)
    for _ in range(_STACK_DEPTH):
        if frame is None:
            return None
        module = frame.f_locals.get("self")
        if isinstance(module, torch.nn.Module) and any(p is anchor for p in module.parameters()):
            return module
        frame = frame.f_back
    return None


def modules_on_stack(anchor: torch.Tensor) -> list[tuple[torch.nn.Module, dict]]:
    """Every module on the call stack that holds ``anchor``, innermost first, each with the locals
    of its innermost frame (a block, then the model running it)."""
    found: dict[int, tuple[torch.nn.Module, dict]] = {}
    frame = sys._getframe(1)
    for _ in range(_STACK_DEPTH):
        if frame is None:
            break
        module = frame.f_locals.get("self")
        if isinstance(module, torch.nn.Module) and id(module) not in found \
                and any(p is anchor for p in module.parameters()):
            found[id(module)] = (module, frame.f_locals)
        frame = frame.f_back
    return list(found.values())


def call_arguments(module: torch.nn.Module) -> tuple[tuple, dict] | None:
    """(args, kwargs) ``module`` was called with, from the ``nn.Module`` call frame on the stack
    (its forward may have rebound the names since), or None."""
    frame = sys._getframe(1)
    for _ in range(_STACK_DEPTH):
        if frame is None:
            return None
        f = frame.f_locals
        if frame.f_code.co_name == "_call_impl" and f.get("self") is module and "args" in f:
            return f["args"], f.get("kwargs") or {}
        frame = frame.f_back
    return None
