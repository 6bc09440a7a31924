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


import torch

from .policies import Mode
from .policies.forecasts import coefficient

__all__ = ["ReferenceCache", "AdaptiveReference"]


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

    def forecast(self, step, basis=("taylor", 1.0)):
        k = step - self.step
        return sum(t * coefficient(basis, k, i) for i, t in enumerate(self.terms))


class _FoCaTerms:
    """FoCa as cache-dit's calibrator runs it, on the tensors themselves: the last two full values,
    the last two values (forecasts included); each forecast advances the latter."""

    HORIZON = 3

    def __init__(self):
        self.full = self.full_prev = self.value = self.previous = None
        self.step: int | None = None

    def compute(self, fresh, step, *_):
        self.full_prev, self.full = self.full, fresh.clone()
        self.previous, self.value = self.value, fresh.clone()
        self.step = step

    def forecast(self, step, basis=None):
        if self.previous is None or self.full_prev is None:
            return self.full
        e = step - self.step
        slope = (self.full - self.full_prev) + (self.value - self.previous)
        if e <= self.HORIZON:
            out = self.full + e / 2 * slope
        else:                                   # step-3 form, damped towards the anchor
            h = self.HORIZON / e
            out = h * (self.full + self.HORIZON / 2 * slope) + (1 - h) * self.full
        self.previous, self.value = self.value, out
        return out


def _terms_for(basis):
    return _FoCaTerms if basis[0] == "foca" else _Terms


class ReferenceCache:
    """Runs ``model`` eagerly under per-site actions, with per-slot caches.

    sites: branch module name -> kind; last_block: name of the block whose output leaves the stack.
    orders / first_enhance: TaylorSeer terms (0 = plain reuse); propagation: ClusCa's gamma;
    halves: parallel-block site -> (start, stop) of the attention channels in its module's input;
    plain_sites: SUBSET sites scattered without propagation; basis: the forecast basis
    (``policies.forecasts``, TaylorSeer's unless given).
    ``from_compiled`` takes the sites from ``explain()``.
    """

    def __init__(self, model: torch.nn.Module, sites: dict[str, str], last_block: str, orders: int = 0,
                 first_enhance: int = 1, propagation: float | None = None, halves: dict | None = None,
                 plain_sites=(), basis=("taylor", 1.0)):
        self.model, self.sites, self.last_block = model, dict(sites), last_block
        self.basis = basis
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
        kw.setdefault("basis", st.policy.forecast_basis)
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
                terms = self.caches[c["slot"]][key] = [_terms_for(self.basis)() for _ in outs]
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
            return _untuple(out, [t.forecast(c["step"], self.basis) for t in terms])
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


class AdaptiveReference:
    """Adaptive caching (``AdaptiveConfig``) run eagerly with hooks on the unmodified module: the
    head's last block takes the decision from its latent output minus block 0's latent input; the
    last middle block's output is, on a cached step, the head's output plus the residual kept at
    the last computed step (the middle blocks still run here, their result unused). One state per
    slot; ``new_request`` drops them all."""

    def __init__(self, model: torch.nn.Module, config, blocks: list[str]):
        from .policies.adaptive import Counters, forecast_basis, forecast_terms

        self.model, self.config = model, config
        fn, bn = config.head_blocks, config.tail_blocks
        self.first, self.head_last, self.middle_last = blocks[0], blocks[fn - 1], blocks[len(blocks) - bn - 1]
        self.slots: dict[int, dict] = {}
        self._new_slot = lambda: {"previous": None, "residuals": None, "counters": Counters(), "anchor": None}
        self.orders = forecast_terms(config)
        self.basis = forecast_basis(config)
        self.decisions: list[tuple[bool, float | None]] = []

    def _anchor(self, s, j, y, step) -> list:
        """Differences ``[Y, Δ1, ...]`` at a computed step, ``None`` past what history allows
        (cache-dit's calibrator: only from step 3 on, and where the last anchor had ``Δ^i``)."""
        terms = [y]
        if self.orders and s["residuals"] is not None:
            old = s["residuals"][j]
            for i in range(self.orders):
                if step < 3 or old[i] is None:
                    break
                terms.append((terms[i] - old[i]) / (step - s["anchor"]))
        return terms + [None] * (self.orders + 1 - len(terms))

    def _forecast(self, terms, k):
        out = 0
        for i, d in enumerate(terms):
            if d is None:
                break
            out = out + d * coefficient(self.basis, k, i)
        return out

    @staticmethod
    def _latent(block_input, outs):
        return next(o for o in outs if o is not None and o.shape == block_input.shape)

    @torch.no_grad()
    def run(self, step: int, slot: int = 0, new_request: bool = False, num_steps: int | None = None, **inputs):
        from .policies.adaptive import decide, record

        if new_request:
            self.slots = {}
        s = self.slots.setdefault(slot, self._new_slot())
        call: dict = {}

        def block_input(module, args, kwargs):
            call["input"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def head_output(module, args, out):
            outs = _tuple(out)
            r = self._latent(call["input"], outs) - call["input"]

            def read():
                p = s["previous"].float()
                return float((r.float() - p).abs().mean() / p.abs().mean())

            fresh = s["previous"] is None
            compute, diff = decide(self.config, step, fresh, s["counters"], read, num_steps)
            record(s["counters"], compute, diff)
            if compute:
                s["previous"] = r.clone()
            call.update(compute=compute, head=[o if o is None else o.clone() for o in outs])
            self.decisions.append((compute, diff))

        def middle_output(module, args, out):
            outs = _tuple(out)
            pairs = [next(i for i, h in enumerate(call["head"]) if h is not None and h.shape == o.shape)
                     if o is not None else None for o in outs]
            if call["compute"]:
                fresh = [None if i is None else o - call["head"][i] for o, i in zip(outs, pairs)]
                if self.basis[0] == "foca":
                    s["residuals"] = s["residuals"] or [_FoCaTerms() for _ in fresh]
                    for y, terms in zip(fresh, s["residuals"]):
                        if y is not None:
                            terms.compute(y, step)
                else:
                    s["residuals"] = [None if y is None else self._anchor(s, j, y, step) for j, y in enumerate(fresh)]
                s["anchor"] = step
                return out
            if self.basis[0] == "foca":
                return _untuple(out, [None if i is None else call["head"][i] + d.forecast(step)
                                      for i, d in zip(pairs, s["residuals"])])
            return _untuple(out, [None if i is None else call["head"][i] + self._forecast(d, step - s["anchor"])
                                  for i, d in zip(pairs, s["residuals"])])

        handles = [self.model.get_submodule(self.first).register_forward_pre_hook(block_input, with_kwargs=True),
                   self.model.get_submodule(self.head_last).register_forward_hook(head_output),
                   self.model.get_submodule(self.middle_last).register_forward_hook(middle_output)]
        try:
            return self.model(**inputs)
        finally:
            for h in handles:
                h.remove()
