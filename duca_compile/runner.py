"""The callable handed back to Dynamo for one graph: each call, plan the step, pick (or lazily build)
the variant for its per-site actions, and pass it the slot's caches and the per-call inputs.

Per slot (a separate cond / uncond pass gets its own) the runner keeps the caches, allocated once
per shape and written in place, plus the method's run-time state: Taylor clocks and clusters.
"""
from __future__ import annotations

import time
import weakref
from collections import Counter

import torch

from .clustering import cluster_representatives, kmeans_l1
from .passes import order_key
from .policies import Mode, StepPlan
from .policies.base import effective_mode
from .runtime import timestep_value
from .taylor import TaylorClock

__all__ = ["GraphRunner"]


class _Slot:
    def __init__(self, runner: "GraphRunner"):
        layout = runner.layout
        self.caches = [torch.zeros(c.shape, dtype=c.dtype, device=c.device) for c in layout.caches]
        self.by_key = {c.key: t for c, t in zip(layout.caches, self.caches)}
        self.epoch = -1                     # request whose FULL step filled these caches
        self.taylor = TaylorClock([s.name for s in runner.sitemap.sites], layout.orders,
                                  getattr(runner.state.config, "first_enhance", 1))
        self.clusters: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # tokens -> (assign, centroids)


class GraphRunner:
    def __init__(self, state, sitemap, layout, build, piece_key, timestep_index, user_indices):
        self.state, self.sitemap, self.layout = state, sitemap, layout
        self.build = build                  # (actions, skip) -> (compiled callable, variant GraphModule)
        self.piece_key, self.timestep_index, self.user_indices = piece_key, timestep_index, user_indices
        self.variants: dict[tuple, object] = {}
        self.variant_graphs: dict[tuple, object] = {}
        self.variant_calls: Counter = Counter()
        self.input_specs: dict[tuple, list] = {}
        self.slots: dict[int, _Slot] = {}
        self.sites = {s.name: s for s in sitemap.sites}
        state.runners.append(weakref.ref(self))

    # -- planning -------------------------------------------------------------------------------
    def plan_step(self, step: int, num_steps: int | None) -> tuple[StepPlan, dict, bool]:
        """The policy's plan for ``step`` as per-site actions, labelled with the mode they amount to."""
        policy = self.state.policy
        plan = policy.plan(step, num_steps)
        actions, skip = policy.actions(plan, self.sitemap.sites, len(self.sitemap.blocks), step, num_steps)
        return StepPlan(effective_mode(actions, skip), plan.ratio), actions, skip

    def variant(self, actions: dict, skip: bool, key: tuple | None = None):
        key = key if key is not None else self.key(actions, skip)
        fn = self.variants.get(key)
        if fn is None:
            start = time.perf_counter()
            fn, self.variant_graphs[key] = self.build(actions, skip)
            self.variants[key] = fn
            st = self.state
            st.stats.variants_compiled += 1
            st.stats.compile_seconds += time.perf_counter() - start
            if len(self.variants) > st.config.max_variants:
                st.warn_once("variants", f"duca: {len(self.variants)} variants compiled for one graph "
                             f"(max_variants={st.config.max_variants}); each distinct per-site plan is a "
                             "separate compile. Use fewer distinct ratios (k_multiple) or raise max_variants.")
        return fn

    @staticmethod
    def key(actions: dict, skip: bool) -> tuple:
        return (skip, tuple(sorted(actions.items())) if not skip else ())

    # -- one call -------------------------------------------------------------------------------
    def _shape_key(self, args) -> tuple:
        return tuple((tuple(args[i].shape), args[i].dtype) if isinstance(args[i], torch.Tensor) else args[i]
                     for i in self.user_indices)

    def _timestep(self, args) -> float | None:
        if self.timestep_index is None:
            return None
        return timestep_value(args[self.timestep_index])

    def _slot(self, slot: int) -> _Slot:
        if slot not in self.slots:
            self.slots[slot] = _Slot(self)
        return self.slots[slot]

    def __call__(self, *args):
        st = self.state
        shape_key = self._shape_key(args)
        if st.shape_keys.get(self.piece_key, shape_key) != shape_key:
            st.stats.shape_resets += 1
            st.epoch += 1                      # never mix caches of two shapes
        st.shape_keys[self.piece_key] = shape_key
        tracked = st.advance_piece((lambda: self._timestep(args)) if self.timestep_index is not None else None)
        slot = self._slot(st.slot)
        if not tracked:
            st.stats.fallback_calls += 1
            st.warn_once("untracked", "duca: this graph has no timestep input and no duca_compile.sampling() "
                         "context is active, so every call runs FULL (no caching)")
        if not tracked or slot.epoch != st.epoch:   # nothing valid to reuse yet in this request
            actions, skip = {s.name: "compute" for s in self.sitemap.sites}, False
            plan = StepPlan(Mode.FULL)
        else:
            plan, actions, skip = self.plan_step(st.step, st.num_steps)
        if slot.epoch != st.epoch:
            slot.taylor.reset()
            slot.clusters = {}
        key = self.key(actions, skip)
        extra = self._inputs(slot, actions, key)
        st.last_plan, st.last_actions, st.last_skip = plan, actions, skip
        out = self.variant(actions, skip, key)(*args, *slot.caches, *extra)
        self.variant_calls[key] += 1
        for name, action in actions.items():
            if action == "compute" and not skip:
                st.selector.full(name)         # every token of a computed site is fresh again
        if plan.mode is Mode.FULL:
            slot.epoch = st.epoch
            if self.layout.propagation is not None:
                self._cluster(slot)
        self._count(plan, actions, skip)
        return out

    def _inputs(self, slot: _Slot, actions: dict, key: tuple) -> list[torch.Tensor]:
        st, out = self.state, []
        st.last_indices, st.last_assign = {}, {}
        specs = self.input_specs.get(key)
        if specs is None:
            specs = self.input_specs[key] = self.layout.inputs(actions)
        for spec in specs:
            if spec.kind == "taylor_coef":
                coef, w = slot.taylor.tables(actions, st.step, spec.device)
                out.append(coef)
            elif spec.kind == "taylor_w":
                out.append(w)
            elif spec.kind == "index":
                idx = self._indices(slot, spec)
                st.last_indices[spec.site] = idx
                out.append(idx)
            else:                              # "assign": the slot's cluster of every token
                st.last_assign[spec.site] = slot.clusters[self.sites[spec.site].tokens[0]][0]
                out.append(st.last_assign[spec.site])
        return out

    def _indices(self, slot: _Slot, spec) -> torch.Tensor:
        st, site = self.state, self.sites[spec.site]
        batch, k = spec.shape
        if self.layout.propagation is not None:
            assign = slot.clusters[site.tokens[0]][0]
            return cluster_representatives(assign, k, st.generator(torch.device(spec.device)))
        norms = self.layout.value_norms.get(site.block)
        score = slot.by_key[f"vnorm:{site.block}"] if norms is not None else None
        return st.select_tokens(spec.site, batch, site.tokens[0], k, spec.device, score)

    def _cluster(self, slot: _Slot) -> None:
        """After a FULL step: k-means per token count, on the hidden state leaving the stack when it
        has that many tokens, else on the last feed-forward output with that many (Flux's streams)."""
        config, st = self.state.config, self.state
        stack = [slot.by_key[f"stack:{i}"] for i in range(len(self.sitemap.stack_outputs))]
        for tokens in sorted({s.tokens[0] for s in self.sitemap.sites if s.subsettable}):
            source = next((t for t in stack if t.ndim == 3 and t.shape[1] == tokens), None)
            if source is None:
                last = [s for s in self.sitemap.sites if s.subsettable and s.tokens[0] == tokens][-1]
                source = slot.by_key[order_key(last.name, 0)]
            k = min(config.clusters, tokens)
            previous = slot.clusters.get(tokens)
            slot.clusters[tokens] = kmeans_l1(source, k, config.kmeans_iters,
                                              init=previous[1] if previous is not None else None,
                                              generator=st.generator(source.device))

    def _count(self, plan, actions, skip) -> None:
        s = self.state.stats
        s.calls += 1
        s.steps[plan.mode.value] += 1
        for site in self.sitemap.sites:
            n = sum(site.tokens)
            s.tokens_total += n
            a = actions[site.name]
            if a == "compute" and not skip:
                s.tokens_computed += n
                continue
            s.cache_hits += 1              # reused, or the rows a SUBSET step did not recompute
            s.block_hits[site.block] += 1
            if isinstance(a, int) and not skip:
                s.tokens_computed += a
        if skip:
            s.cache_hits += 1              # the stack output itself
