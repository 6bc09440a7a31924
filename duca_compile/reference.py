"""The eager oracle: the same caching semantics in plain PyTorch, on the unmodified module.

Forward hooks on the branch modules and on the last block replace their outputs; nothing is
traced or rewritten, so it checks the compiled variants by a different mechanism. A SUBSET site is
computed in full and only the selected rows are kept — equal to computing those rows alone,
because cross-attention queries and feed-forward layers act on each token independently.
"""
from __future__ import annotations

import torch

from .policies import Mode

__all__ = ["ReferenceCache"]


def _map(fn, out):
    return tuple(fn(o) for o in out) if isinstance(out, tuple) else fn(out)


def _keep_rows(cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    rows = idx.unsqueeze(-1).expand(-1, -1, fresh.shape[-1])
    return cache.clone().scatter_(1, rows, fresh.gather(1, rows))


class ReferenceCache:
    """Runs ``model`` eagerly under one mode per call, with per-slot caches.

    sites: branch module name -> kind ("self_attn" | "cross_attn" | "ff"); last_block: name of the
    block whose output leaves the stack. Use ``from_compiled`` to take both from ``explain()``.
    """

    def __init__(self, model: torch.nn.Module, sites: dict[str, str], last_block: str):
        self.model, self.sites, self.last_block = model, dict(sites), last_block
        self.caches: dict[int, dict] = {}
        self._mode, self._indices, self._slot = Mode.FULL, {}, 0

    @classmethod
    def from_compiled(cls, model, compiled) -> "ReferenceCache":
        from .report import explain

        graph = explain(compiled, as_text=False)[0]
        return cls(model, {s["name"]: s["kind"] for s in graph["sites"]}, graph["blocks"][-1])

    def _site_hook(self, name):
        def hook(module, args, out):
            cache = self.caches.setdefault(self._slot, {})
            if self._mode is Mode.FULL:
                cache[name] = _map(torch.clone, out)
                return out
            if self._mode is Mode.SKIP:
                return out                      # the stack output is replaced; caches stay as they are
            if name in self._indices:
                cache[name] = _keep_rows(cache[name], out, self._indices[name])
            return cache[name]
        return hook

    def _stack_hook(self, module, args, out):
        cache = self.caches.setdefault(self._slot, {})
        if self._mode is Mode.SKIP:
            return cache["stack"]
        cache["stack"] = _map(torch.clone, out)
        return out

    @torch.no_grad()
    def __call__(self, mode: Mode, indices: dict | None = None, slot: int = 0, **inputs):
        """One forward call in ``mode``; ``indices`` maps each SUBSET site to its ``[batch, k]`` tokens."""
        self._mode, self._indices, self._slot = Mode(mode), dict(indices or {}), slot
        handles = [self.model.get_submodule(n).register_forward_hook(self._site_hook(n)) for n in self.sites]
        handles.append(self.model.get_submodule(self.last_block).register_forward_hook(self._stack_hook))
        try:
            return self.model(**inputs)
        finally:
            for h in handles:
                h.remove()
