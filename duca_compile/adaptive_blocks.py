"""Adaptive caching under regional compilation: the decision is taken after block ``head_blocks − 1``
and governs the rest of that model call.

Each block graph is compiled once, unchanged, and serves every call that computes it. Between the
block graphs runs the model's own eager code, so the little arithmetic around the decision runs
there too: the head's residual (its latent output minus block 0's latent input), the two means of
the one host read, and the middle residual (the last middle block's outputs minus the head's,
paired by the input each continues). On a cached step the middle blocks hand their inputs on
unchanged, without running, and the last of them returns the head's outputs plus the cached (or
TaylorSeer-forecast) residual; the tail blocks run on that.

Which block is the last middle one is known once a model call has run every block: the first call
of a model keeps the last ``tail_blocks + 1`` blocks' residuals and settles it at the next call.
"""
from __future__ import annotations

import operator
import time
from collections import Counter, deque

import torch

from .policies import Mode, StepPlan
from .policies.adaptive import Counters, Forecast, decide, forecast_basis, forecast_terms, record
from .policies.forecasts import next_terms
from .regional import _LEADERS, enter_block
from .runner import count_call, derive
from .runtime import CompiledCallable

__all__ = ["AdaptiveBlockRunner", "AdaptiveStack", "ADAPTIVE_IN_REGIONAL"]

FULL, PASS, REUSE = "FULL", "PASS", "REUSE"      # a block's three kinds of call

ADAPTIVE_IN_REGIONAL = ("adaptive in regional mode: decided after the last head block; on a cached step the "
                        "middle blocks hand their inputs on without running and the last of them returns the "
                        "head's streams plus the cached residual")


class _Slot:
    """One cache slot (a CFG branch run as its own call) of one model: what the decisions and the
    cached steps need, across the calls of a request."""

    def __init__(self, orders: int, basis: tuple):
        self.orders, self.basis = orders, basis
        self.epoch = -1                  # request whose computed step filled these caches
        self.previous = None             # the head residual of the last computed step
        self.terms: dict[str, list] = {}     # stream name -> [middle residual, its differences...]
        self.pending: deque | None = None    # first call of a model: (layer, step, residuals) of recent blocks
        self.start()

    def start(self) -> None:
        self.counters = Counters()
        self.forecast = Forecast(self.orders, self.basis) if self.orders else None


class AdaptiveStack:
    """One model's adaptive state across its block graphs: per slot caches, and the call in flight."""

    def __init__(self, config):
        self.config = config
        self.orders = forecast_terms(config)
        self.slots: dict[int, _Slot] = {}
        self.length: int | None = None     # blocks per model call, once a call has run them all
        self.calls = 0                     # model calls begun
        self.refused = ""                  # why this model is not cached ("" = it is)
        self.decisions: list[dict] = []    # this request's: epoch, step, slot, diff, computed
        self.enter = None                  # this call's latent input of block 0
        self.head: dict[str, torch.Tensor] = {}    # this call's head outputs by the input each continues
        self.compute = True                # this call's decision

    def cache_bytes(self) -> int:
        tensors = [t for s in self.slots.values() for t in [s.previous, *(x for ts in s.terms.values() for x in ts)]]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def slot(self, index: int) -> _Slot:
        if index not in self.slots:
            self.slots[index] = _Slot(self.orders, forecast_basis(self.config))
        return self.slots[index]

    @property
    def middle_last(self) -> int | None:
        return None if self.length is None else self.length - self.config.tail_blocks - 1

    def begin(self, st, blocks: int) -> None:
        """A model call starts: after the first, the blocks seen so far are every block of a call."""
        self.enter, self.head, self.compute = None, {}, True
        if not self.calls and st.selector.world > 1 and not self.refused:
            # each rank would decide on its own tokens: whole-model graphs reduce the decision in the graph
            self._refuse(st, "regional compilation under context parallelism (compile the whole transformer, "
                             "whose head graph reduces the decision over the ranks)")
        if self.length is None and self.calls:
            self.length = blocks
            c = self.config
            if c.head_blocks + c.tail_blocks >= blocks:
                self._refuse(st, f"head_blocks={c.head_blocks} + tail_blocks={c.tail_blocks} leave no block to "
                                 f"cache in a stack of {blocks}")
            for slot in self.slots.values():
                if slot.pending is not None and not self.refused:
                    kept = next((p for p in slot.pending if p[0] == self.middle_last), None)
                    if kept is None or isinstance(kept[2], str):
                        self._refuse(st, kept[2] if kept else "the first call ran fewer blocks than a stack holds")
                    else:
                        self._anchor(slot, kept[1], kept[2])
                slot.pending = None
        self.calls += 1

    def _refuse(self, st, why: str) -> None:
        self.refused = why
        st.uncached.append(f"adaptive caching: {why}")
        st.warn_once("adaptive-blocks", f"duca: no adaptive caching for this model ({why}); its blocks run plainly")

    # -- the arithmetic between blocks ------------------------------------------------------------
    def decide(self, st, slot: _Slot, latent: torch.Tensor, tracked: bool) -> bool:
        r = latent - self.enter
        fresh = not tracked or slot.epoch != st.epoch
        if slot.epoch != st.epoch:
            slot.start()
        if self.decisions and self.decisions[-1]["epoch"] != st.epoch:
            self.decisions = []

        def read() -> float:
            st.stats.decision_reads += 1
            p = slot.previous.float()
            change, scale = torch.stack([(r.float() - p).abs().mean(), p.abs().mean()]).tolist()
            return change / scale if scale else float("inf")

        compute, value = decide(self.config, st.step, fresh, slot.counters, read, st.num_steps)
        record(slot.counters, compute, value)
        if compute:
            slot.previous, slot.epoch = r, st.epoch
        self.decisions.append({"epoch": st.epoch, "step": st.step, "slot": st.slot, "diff": value,
                               "computed": compute})
        return compute

    def residuals(self, streams, out) -> dict | str:
        """The middle residual of each output of a middle block (or why there is none)."""
        got = {}
        for name, y in zip(streams.names, out):
            h = self.head.get(name)
            if h is None:
                same = [t for t in self.head.values() if t.shape == y.shape and t.dtype == y.dtype]
                h = same[0] if len(same) == 1 else None
            if h is None or h.shape != y.shape:
                return f"the stream {name} leaving the middle blocks has no counterpart leaving the head blocks"
            got[name] = y - h
        return got

    def _anchor(self, slot: _Slot, step: int, residuals: dict) -> None:
        """A computed step's middle residuals, with their finite differences (``build_rest``'s COMPUTE)."""
        w = slot.forecast.weights(step) if slot.forecast is not None else []
        for name, y in residuals.items():
            old = slot.terms.get(name) or [torch.zeros_like(y)] * (self.orders + 1)
            slot.terms[name] = next_terms(self.config.forecast, y, old, w, operator.sub, operator.mul)

    def cached(self, slot: _Slot, step: int, streams, args) -> tuple:
        """The last middle block's outputs on a cached step: the head's plus the (forecast) residual."""
        coefficients = slot.forecast.coefficients(step) if slot.forecast is not None else [1.0]
        outs = []
        for name, source in zip(streams.names, streams.sources):
            terms = slot.terms.get(name)
            if terms is None:
                outs.append(args[source])
                continue
            h = self.head.get(name)
            if h is None:
                h = next(t for t in self.head.values() if t.shape == terms[0].shape and t.dtype == terms[0].dtype)
            for term, c in zip(terms, coefficients):
                h = h + term * c if self.orders else h + term
            outs.append(h)
        return tuple(outs)


class AdaptiveBlockRunner(CompiledCallable):
    """Serves every block Dynamo routes through one block graph, under ``AdaptiveConfig``: runs the
    compiled block, hands its inputs on, or returns the cached stream, as the model's decision for
    the call says (``AdaptiveStack``)."""

    def __init__(self, resolve, settings, sitemap, streams, gm, example_inputs, compile_variant, user_indices,
                 strided=(), share_key=None, fallbacks=()):
        self.resolve, self.settings, self.config = resolve, settings, settings.config
        self.sitemap, self.streams, self.gm = sitemap, streams, gm
        self.example_inputs, self.compile_variant = example_inputs, compile_variant
        self.user_indices, self.strided = user_indices, frozenset(strided)
        self.fallbacks = list(fallbacks)
        self.variant_graphs = {FULL: gm}
        out = gm.graph.output_node().args[0]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.out_strides = [n.meta["example_value"].stride() for n in outs]
        self.fn = None
        self.compiles = 0
        self.leader = _LEADERS.get(share_key) if share_key is not None else None
        if self.leader is None and share_key is not None:
            _LEADERS[share_key] = self

    def _compiled(self, st):
        owner = self.leader if self.leader is not None else self
        if owner.fn is None:
            start = time.perf_counter()
            owner.fn = owner.compile_variant(owner.gm, owner.example_inputs)
            owner.compiles += 1
            st.stats.variants_compiled += 1
            st.stats.compile_seconds += time.perf_counter() - start
        return owner.fn

    def __call__(self, *args):
        if self.strided:
            args = tuple(a.contiguous() if i in self.strided else a for i, a in enumerate(args))
        st, block, tracked, first = enter_block(self, args)
        stack = st.regional
        a = stack.adaptive
        if a is None:
            a = stack.adaptive = AdaptiveStack(self.config)
        if first:
            a.begin(st, len(stack.blocks))
        if not tracked:
            st.stats.fallback_calls += first
            st.warn_once("untracked", "duca: the model's forward has no timestep argument and no "
                         "duca_compile.sampling() context is active, so every call runs FULL (no caching)")
        kind, out = self._run(st, a, block.layer, args, tracked)
        block.piece.variant_calls[kind] += 1
        self._count(st, stack, block, kind, model_call=block.layer == (0 if a.refused else a.config.head_blocks - 1))
        return out

    def _run(self, st, a: AdaptiveStack, layer: int, args, tracked: bool) -> tuple[str, tuple]:
        fn, s, c = self._compiled(st), self.streams, self.config
        if a.refused:
            return FULL, fn(*args)
        slot = a.slot(st.slot)
        if layer == 0:
            a.enter = args[s.latent_in]
        middle_last = a.middle_last
        if layer < c.head_blocks or (middle_last is not None and layer > middle_last) or a.compute:
            out = fn(*args)
            if layer == c.head_blocks - 1:
                latent = out[s.latent_out]
                if latent.shape != a.enter.shape:
                    a._refuse(st, f"the head's latent output {tuple(latent.shape)} does not continue block 0's "
                                  f"input {tuple(a.enter.shape)}")
                    return FULL, out
                a.compute = a.decide(st, slot, latent, tracked)
                a.head = dict(zip(s.names, out))
            elif layer >= c.head_blocks and a.compute and (middle_last is None or layer == middle_last):
                residuals = a.residuals(s, out)
                if middle_last is None:         # first call: the last middle block is not known yet
                    if slot.pending is None:
                        slot.pending = deque(maxlen=c.tail_blocks + 1)
                    slot.pending.append((layer, st.step, residuals))
                elif isinstance(residuals, str):
                    a._refuse(st, residuals)
                else:
                    a._anchor(slot, st.step, residuals)
            return FULL, out
        if layer < middle_last:
            return PASS, tuple(self._as_output(args[i], j) for j, i in enumerate(s.sources))
        return REUSE, tuple(self._as_output(x, j) for j, x in enumerate(a.cached(slot, st.step, s, args)))

    def _as_output(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """``x`` handed on as output ``i``: as is, or copied into the output's strides (a block's
        input can have other strides than its outputs, and the next block's graph guards on them)."""
        if x.stride() == self.out_strides[i]:
            return x
        return torch.empty_strided(x.shape, self.out_strides[i], dtype=x.dtype, device=x.device).copy_(x)

    def _count(self, st, stack, block, kind: str, model_call: bool) -> None:
        """Stats of one block call: its sites' tokens and hits; at the block that decides, also the
        model call, as FULL (middle blocks computed) or SKIP (cached)."""
        call = Mode.FULL if stack.adaptive.compute else Mode.SKIP
        mode = call if model_call else (Mode.FULL if kind == FULL else Mode.SKIP)
        p = block.planned.get(("adaptive", kind, mode))
        if p is None:
            local = {s.name: "compute" if kind == FULL else "reuse" for s in self.sitemap.sites}
            p = block.planned[("adaptive", kind, mode)] = derive(
                StepPlan(mode), {block.names[k]: v for k, v in local.items()}, mode is Mode.SKIP, block.sites,
                (mode is Mode.SKIP, ()), local, stack_hit=kind == REUSE)
        st.last_plan, st.last_skip = StepPlan(call), call is Mode.SKIP
        if self.fallbacks:
            st.note_fallbacks(self.fallbacks)
        count_call(st, p, model_call)

    def flops(self, piece) -> dict:
        """The block graph's FLOPs per call that ran it, against per call."""
        from .flops import graph_flops

        ran, calls = piece.variant_calls.get(FULL, 0), sum(piece.variant_calls.values())
        each = graph_flops(self.gm) if calls else 0
        return {"flops_run": ran * each, "flops_full": calls * each, "flops_clustering": 0,
                "tokens_per_site": {s.name: ran * sum(s.tokens) for s in self.sitemap.sites}}
