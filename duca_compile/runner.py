"""The callable handed back to Dynamo for one graph: each call, find the caching state of the model
the call's weights belong to, plan the step, pick (or lazily build) the variant for its per-site
actions, and pass it the slot's caches and the per-call inputs.

One runner serves every model instance Dynamo routes through its graph, so it holds only what the
graph determines (sites, layout, compiled variants). What a model keeps for the graph is a
``Piece`` in that model's state: caches per slot (a separate cond / uncond pass gets its own),
allocated once per shape and written in place, the method's run-time state (Taylor clocks,
clusters), and how often each variant ran.
"""
from __future__ import annotations

import time
from collections import Counter

import torch

from .clustering import cluster_representatives, kmeans_l1
from .passes import order_key
from .policies import Mode, StepPlan, make_policy
from .policies.base import effective_mode
from .runtime import timestep_value
from .taylor import TaylorClock

__all__ = ["GraphRunner", "Piece"]


class _Slot:
    def __init__(self, runner: "GraphRunner"):
        layout = runner.layout
        self.caches = [torch.zeros(c.shape, dtype=c.dtype, device=c.device) for c in layout.caches]
        self.by_key = {c.key: t for c, t in zip(layout.caches, self.caches)}
        self.epoch = -1                     # request whose FULL step filled these caches
        self.taylor = TaylorClock([s.name for s in runner.sitemap.sites], layout.orders,
                                  getattr(runner.config, "first_enhance", 1))
        self.clusters: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # tokens -> (assign, centroids)


class Piece:
    """One model's share of one compiled graph: its cache slots and its calls per variant. It keeps
    no reference to the runner (the key of ``ModelState.pieces``, held weakly): a graph Dynamo drops
    frees its caches."""

    def __init__(self):
        self.slots: dict[int, _Slot] = {}
        self.variant_calls: Counter = Counter()

    def slot(self, index: int, runner: "GraphRunner") -> _Slot:
        if index not in self.slots:
            self.slots[index] = _Slot(runner)
        return self.slots[index]

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.slots.values() for t in s.caches)


class GraphRunner:
    def __init__(self, resolve, settings, sitemap, layout, build, timestep_index, user_indices):
        self.resolve, self.settings = resolve, settings      # resolve(args) -> the model's ModelState
        self.config = settings.config
        self.policy = make_policy(self.config)
        self.sitemap, self.layout = sitemap, layout
        self.build = build                  # (actions, skip) -> (compiled callable, variant GraphModule)
        self.timestep_index, self.user_indices = timestep_index, user_indices
        self.variants: dict[tuple, object] = {}
        self.variant_graphs: dict[tuple, object] = {}
        self.input_specs: dict[tuple, list] = {}
        self.sites = {s.name: s for s in sitemap.sites}

    # -- planning -------------------------------------------------------------------------------
    def plan_step(self, step: int, num_steps: int | None) -> tuple[StepPlan, dict, bool]:
        """The policy's plan for ``step`` as per-site actions, labelled with the mode they amount to."""
        plan = self.policy.plan(step, num_steps)
        actions, skip = self.policy.actions(plan, self.sitemap.sites, len(self.sitemap.blocks), step, num_steps)
        return StepPlan(effective_mode(actions, skip), plan.ratio), actions, skip

    def variant(self, actions: dict, skip: bool, key: tuple | None = None, state=None):
        key = key if key is not None else self.key(actions, skip)
        fn = self.variants.get(key)
        if fn is None:
            start = time.perf_counter()
            fn, self.variant_graphs[key] = self.build(actions, skip)
            self.variants[key] = fn
            if state is not None:
                state.stats.variants_compiled += 1
                state.stats.compile_seconds += time.perf_counter() - start
                if len(self.variants) > self.config.max_variants:
                    state.warn_once("variants", f"duca: {len(self.variants)} variants compiled for one graph "
                                    f"(max_variants={self.config.max_variants}); each distinct per-site plan is a "
                                    "separate compile. Use fewer distinct ratios (k_multiple) or raise max_variants.")
        return fn

    @staticmethod
    def key(actions: dict, skip: bool) -> tuple:
        return (skip, tuple(sorted(actions.items())) if not skip else ())

    # -- one call -------------------------------------------------------------------------------
    def _shape_key(self, args) -> tuple:
        return tuple((tuple(args[i].shape), args[i].dtype) if isinstance(args[i], torch.Tensor) else args[i]
                     for i in self.user_indices)

    def piece(self, state) -> Piece:
        piece = state.pieces.get(self)
        if piece is None:
            piece = state.pieces[self] = Piece()
        return piece

    def __call__(self, *args):
        st = self.resolve(args)
        piece = self.piece(st)
        shape_key, anchor = self._shape_key(args), id(args[self.resolve.anchor_index])
        if st.shape_keys.get(anchor, shape_key) != shape_key:
            st.stats.shape_resets += 1
            st.epoch += 1                      # never mix caches of two shapes
        st.shape_keys[anchor] = shape_key
        i = self.timestep_index
        tracked = st.advance_piece((lambda: timestep_value(args[i])) if i is not None else None)
        slot = piece.slot(st.slot, self)
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
        extra = self._inputs(st, slot, actions, key)
        st.last_plan, st.last_actions, st.last_skip = plan, actions, skip
        out = self.variant(actions, skip, key, st)(*args, *slot.caches, *extra)
        piece.variant_calls[key] += 1
        for name, action in actions.items():
            if action == "compute" and not skip:
                st.selector.full(name)         # every token of a computed site is fresh again
        if plan.mode is Mode.FULL:
            slot.epoch = st.epoch
            if self.layout.propagation is not None:
                self._cluster(st, slot)
        self._count(st, plan, actions, skip)
        return out

    def _inputs(self, st, slot: _Slot, actions: dict, key: tuple) -> list[torch.Tensor]:
        out = []
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
                idx = self._indices(st, slot, spec)
                st.last_indices[spec.site] = idx
                out.append(idx)
            else:                              # "assign": the slot's cluster of every token
                st.last_assign[spec.site] = slot.clusters[self.sites[spec.site].tokens[0]][0]
                out.append(st.last_assign[spec.site])
        return out

    def _indices(self, st, slot: _Slot, spec) -> torch.Tensor:
        site = self.sites[spec.site]
        batch, k = spec.shape
        if self.layout.propagation is not None:
            assign = slot.clusters[site.tokens[0]][0]
            return cluster_representatives(assign, k, st.generator(torch.device(spec.device)))
        norms = self.layout.value_norms.get(site.block)
        score = slot.by_key[f"vnorm:{site.block}"] if norms is not None else None
        return st.select_tokens(spec.site, batch, site.tokens[0], k, spec.device, score)

    def _cluster(self, st, slot: _Slot) -> None:
        """After a FULL step: k-means per token count, on the hidden state leaving the stack when it
        has that many tokens, else on the last feed-forward output with that many (Flux's streams)."""
        config = self.config
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

    def _count(self, st, plan, actions, skip) -> None:
        s = st.stats
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
