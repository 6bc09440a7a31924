"""The eager oracle: the same caching semantics in plain PyTorch, on the unmodified module.

Forward hooks on the branch modules and on the last block replace their outputs; nothing is
traced or rewritten, so it checks the compiled variants by a different mechanism. A SUBSET site is
computed in full and only the selected rows are kept — equal to computing those rows alone,
because cross-attention queries and feed-forward layers act on each token independently.
TaylorSeer terms are kept as a list per site and divided by the step distance; ClusCa
propagation reads each representative's row from the full output. A parallel block (Flux single
blocks) keeps the attention channels of its branch module's input from the last computed step and,
on SUBSET steps, runs the module on them next to the current token-wise channels.
"""
from __future__ import annotations

import math

import torch

from .policies import Mode

__all__ = ["ReferenceCache"]


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _untuple(like, values):
    return tuple(values) if isinstance(like, tuple) else values[0]


def _rows(idx: torch.Tensor, channels: int) -> torch.Tensor:
    return idx.unsqueeze(-1).expand(-1, -1, channels)


class _Terms:
    """One site output's Taylor terms ``[Δ0, Δ1, …]`` and the step they were taken at."""

    def __init__(self):
        self.terms: list[torch.Tensor] = []
        self.step: int | None = None

    def compute(self, fresh, step, orders, first_enhance):
        if self.step is None or step <= first_enhance - 2:
            new = [fresh.clone()]
        else:
            new, d = [fresh.clone()], step - self.step
            for i in range(min(len(self.terms), orders)):
                new.append((new[i] - self.terms[i]) / d)
        self.terms, self.step = new, step

    def forecast(self, step):
        k = step - self.step
        return sum(t * (k ** i / math.factorial(i)) for i, t in enumerate(self.terms))


class ReferenceCache:
    """Runs ``model`` eagerly under per-site actions, with per-slot caches.

    sites: branch module name -> kind; last_block: name of the block whose output leaves the stack.
    orders / first_enhance: TaylorSeer terms (0 = plain reuse); propagation: ClusCa's gamma;
    halves: parallel-block site -> (start, stop) of the attention channels in its module's input;
    plain_sites: SUBSET sites scattered without propagation.
    ``from_compiled`` takes the sites from ``explain()``.
    """

    def __init__(self, model: torch.nn.Module, sites: dict[str, str], last_block: str, orders: int = 0,
                 first_enhance: int = 1, propagation: float | None = None, halves: dict | None = None,
                 plain_sites=()):
        self.model, self.sites, self.last_block = model, dict(sites), last_block
        self.halves, self.plain_sites = dict(halves or {}), set(plain_sites)
        self.orders, self.first_enhance, self.propagation = orders, first_enhance, propagation
        self.caches: dict[int, dict] = {}
        self._call: dict = {}

    @classmethod
    def from_compiled(cls, model, compiled, **kw) -> "ReferenceCache":
        """An oracle with ``compiled``'s sites and, unless given, its method's Taylor orders,
        warm-up and ClusCa propagation."""
        from .report import explain
        from .runtime import state_of

        st = state_of(compiled)
        kw.setdefault("orders", st.policy.taylor_orders)
        kw.setdefault("first_enhance", st.policy.taylor_warmup)
        kw.setdefault("propagation", st.policy.propagation)
        graph = next(g for g in explain(compiled, as_text=False) if g["sites"])
        kw.setdefault("halves", {s["name"]: tuple(s["attention_channels"]) for s in graph["sites"]
                                 if "attention_channels" in s})
        kw.setdefault("plain_sites", {s["name"] for s in graph["sites"] if not st.policy.propagates(s["latent"])})
        return cls(model, {s["name"]: s["kind"] for s in graph["sites"]}, graph["blocks"][-1], **kw)

    def replay(self, compiled, **inputs):
        """Run ``inputs`` with the actions, indices and slot of ``compiled``'s last call."""
        from .runtime import state_of

        st = state_of(compiled)
        return self.run(st.last_actions, st.last_skip, st.last_indices, slot=st.slot, step=st.step,
                        assign=st.last_assign, **inputs)

    def _site_hook(self, name):
        def hook(module, args, out):
            c = self._call
            if c["skip"] and c["actions"][name] != "compute":
                return out                      # the stack output is replaced; caches stay as they are
            # a module run twice per forward (CogView4's shared ``ff``: image, then text) caches each call
            call = c["calls"][name] = c["calls"].get(name, -1) + 1
            key = (name, call)
            terms = self.caches.setdefault(c["slot"], {}).setdefault(key, None)
            outs = _tuple(out)
            if terms is None:
                terms = self.caches[c["slot"]][key] = [_Terms() for _ in outs]
            action, half = c["actions"][name], self.halves.get(name)
            if action == "compute":
                for t, o in zip(terms, outs):
                    t.compute(o, c["step"], self.orders, self.first_enhance)
                if half is not None:
                    self.caches[c["slot"]][key + ("half",)] = args[0][..., half[0]:half[1]].clone()
                return out
            if action != "reuse":               # SUBSET: the selected rows are fresh
                fresh, idx, base = outs[0], c["indices"][name], terms[0].terms[0]
                if half is not None:            # the attention channels as last computed
                    x = args[0].clone()
                    x[..., half[0]:half[1]] = self.caches[c["slot"]][key + ("half",)]
                    fresh = module.forward(x)
                rows = _rows(idx, fresh.shape[-1])
                if self.propagation is not None and name not in self.plain_sites:
                    rep_of_token = idx.gather(1, c["assign"][name])          # [batch, tokens]
                    rep = fresh.gather(1, _rows(rep_of_token, fresh.shape[-1]))
                    base = self.propagation * rep + (1 - self.propagation) * base
                terms[0].terms[0] = base.clone().scatter_(1, rows, fresh.gather(1, rows))
            return _untuple(out, [t.forecast(c["step"]) for t in terms])
        return hook

    def _stack_hook(self, module, args, out):
        cache = self.caches.setdefault(self._call["slot"], {})
        if self._call["skip"]:
            return cache["stack"]
        # a last joint block may return (None, hidden): Stable Diffusion 3's context_pre_only block
        cache["stack"] = tuple(None if o is None else o.clone() for o in out) if isinstance(out, tuple) else out.clone()
        return out

    @torch.no_grad()
    def run(self, actions: dict, skip: bool = False, indices: dict | None = None, slot: int = 0, step: int = 0,
            assign: dict | None = None, **inputs):
        """One forward call: ``actions`` maps each site to "compute" | "reuse" | k (rows in ``indices``)."""
        self._call = dict(actions=actions, skip=skip, indices=dict(indices or {}), slot=slot, step=step,
                          assign=dict(assign or {}), calls={})
        handles = [self.model.get_submodule(n).register_forward_hook(self._site_hook(n)) for n in self.sites]
        handles.append(self.model.get_submodule(self.last_block).register_forward_hook(self._stack_hook))
        try:
            return self.model(**inputs)
        finally:
            for h in handles:
                h.remove()

    def __call__(self, mode: Mode, indices: dict | None = None, slot: int = 0, step: int = 0, **inputs):
        """One call in a uniform ``mode`` (every site alike; self-attention reused on SUBSET)."""
        mode, indices = Mode(mode), dict(indices or {})
        actions = {n: "compute" if mode is Mode.FULL else indices[n] if n in indices else "reuse"
                   for n in self.sites}
        return self.run(actions, mode is Mode.SKIP, indices, slot, step, **inputs)
