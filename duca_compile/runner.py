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
from dataclasses import dataclass
from types import MappingProxyType

import torch

from .fallbacks import Fallback
from .policies.kmeans import cluster_representatives, kmeans_l1
from .passes import order_key, vnorm_key
from .passes.layout import cluster_key, last_token_wise
from .policies import Mode, StepPlan, make_policy
from .policies.base import effective_mode
from .runtime import CompiledCallable
from .policies.taylor_series import TaylorClock

__all__ = ["GraphRunner", "Piece", "SUBSET"]

SUBSET = "subset"        # a SUBSET action in a variant pattern: any k


@dataclass(frozen=True)
class _Planned:
    """One step's plan with everything a call derives from it alone, worked out once per
    (step, num_steps) instead of once per call: its key, the sites it computes in full, its stats."""

    plan: StepPlan
    actions: MappingProxyType       # read-only: shared by every call of the step
    skip: bool
    key: tuple
    computed: tuple          # sites whose every token is fresh after the call
    tokens_total: int
    tokens_computed: int
    cache_hits: int
    block_hits: dict


def derive(plan, actions: dict, skip: bool, sites, key: tuple, local: dict | None = None,
           stack_hit: bool = True) -> _Planned:
    """``_Planned`` for ``sites`` (named as in ``actions``) under one plan; ``local``: the actions
    under the graph's own site names, when those differ (a block graph); ``stack_hit``: count the
    stack output read on a SKIP step here (once per model call)."""
    total = computed = hits = 0
    blocks: Counter = Counter()
    for site in sites:
        n, a = sum(site.tokens), actions[site.name]
        total += n
        if a == "compute":         # also on a SKIP step whose first blocks refresh their caches
            computed += n
            continue
        hits += 1                  # reused, or the rows a SUBSET step did not recompute
        blocks[site.block] += 1
        if isinstance(a, int) and not skip:
            computed += a
    hits += skip and stack_hit     # the stack output itself
    fresh = tuple(s.name for s in sites if actions[s.name] == "compute")
    return _Planned(plan, MappingProxyType(local if local is not None else actions), skip, key, fresh, total,
                    computed, hits, dict(blocks))


class _Slot:
    def __init__(self, runner: "GraphRunner"):
        layout = runner.layout
        self.caches = [torch.zeros(c.shape, dtype=c.dtype, device=c.device) for c in layout.caches]
        self.by_key = {c.key: t for c, t in zip(layout.caches, self.caches)}
        self.epoch = -1                     # request whose FULL step filled these caches
        self.taylor = TaylorClock([s.name for s in runner.sitemap.sites], layout.orders, runner.policy.taylor_warmup,
                                  runner.policy.forecast_basis)
        self.clusters: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # tokens -> (assign, centroids)


class Piece:
    """One model's share of one compiled graph: its cache slots and its calls per variant. It keeps
    no reference to the runner (the key of ``ModelState.pieces``, held weakly): a graph Dynamo drops
    frees its caches."""

    def __init__(self, names: dict | None = None):
        self.slots: dict[int, _Slot] = {}
        self.variant_calls: Counter = Counter()
        self.cold_clusterings = 0   # ClusCa k-means runs from random centroids (a slot's first)
        self.names = names          # the graph's site names -> the model's (a block graph), or None

    def slot(self, index: int, runner: "GraphRunner") -> _Slot:
        if index not in self.slots:
            self.slots[index] = _Slot(runner)
        return self.slots[index]

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.slots.values() for t in s.caches)


class GraphRunner(CompiledCallable):
    def __init__(self, resolve, settings, sitemap, layout, build, timestep_index, user_indices, fallbacks=()):
        self.resolve, self.settings = resolve, settings      # resolve(args) -> the model's ModelState
        self.config = settings.config
        self.policy = make_policy(self.config)
        self.sitemap, self.layout = sitemap, layout
        self.build = build     # (actions, skip, generic) -> (compiled, accepts(index tensors), variant graph)
        self.timestep_index, self.user_indices = timestep_index, user_indices
        self.variants: dict[tuple, tuple] = {}         # pattern -> (compiled, accepts(index tensors))
        self.variant_graphs: dict[tuple, object] = {}   # pattern (or a plan compiled apart) -> graph
        self.variant_fns: dict[tuple, object] = {}      # the same keys -> what the inner compiler made of it
        self.by_plan: dict[tuple, object] = {}          # plan key -> compiled: the per-call lookup
        self._planned: dict[tuple, _Planned] = {}       # (step, num_steps) -> plan and what follows
        self.compiles = 0
        self.input_specs: dict[tuple, list] = {}
        self.sites = {s.name: s for s in sitemap.sites}
        # what this graph does other than asked (fallbacks.Fallback), noted in each model it serves
        self.fallbacks: list[Fallback] = list(fallbacks)

    # -- planning -------------------------------------------------------------------------------
    def plan_step(self, step: int, num_steps: int | None) -> tuple[StepPlan, dict, bool]:
        """The policy's plan for ``step`` as per-site actions, labelled with the mode they amount to."""
        plan = self.policy.plan(step, num_steps)
        actions, skip = self.policy.actions(plan, self.sitemap.sites, len(self.sitemap.blocks), step, num_steps)
        return StepPlan(effective_mode(actions, skip), plan.ratio), actions, skip

    def planned(self, step: int | None, num_steps: int | None) -> _Planned:
        """``plan_step`` with what follows from it, memoized (plans depend on nothing else);
        ``step=None``: the FULL plan a request starts with."""
        p = self._planned.get((step, num_steps))
        if p is None:
            if step is None:
                plan, actions, skip = StepPlan(Mode.FULL), {s.name: "compute" for s in self.sitemap.sites}, False
            else:
                plan, actions, skip = self.plan_step(step, num_steps)
            p = self._planned[(step, num_steps)] = self._derive(plan, actions, skip)
        return p

    def _derive(self, plan, actions, skip) -> _Planned:
        return derive(plan, actions, skip, self.sitemap.sites, self.key(actions, skip))

    def variant(self, actions: dict, skip: bool, key: tuple | None = None, state=None):
        """The compiled callable for one plan. Plans differing only in their SUBSET sizes share one
        compile (its token count k is symbolic); a k-tuple it does not accept gets its own."""
        key = key if key is not None else self.key(actions, skip)
        fn = self.by_plan.get(key)
        if fn is not None:
            return fn
        pattern = self.pattern(key)
        if pattern not in self.variants:
            self.variants[pattern] = self._compile(actions, skip, pattern, True, state)
        fn, accepts = self.variants[pattern]
        if pattern != key and not accepts(self._index_examples(actions)):
            fn = self._compile(actions, skip, key, False, state)[0]
            ks = sorted({a for a in actions.values() if isinstance(a, int)})
            self.fallbacks.append(Fallback("plan_compiled_apart", f"SUBSET k={','.join(map(str, ks))}",
                                           "the compiler's assumptions about k exclude these sizes"))
        self.by_plan[key] = fn
        return fn

    def _compile(self, actions, skip, name, generic: bool, state):
        start = time.perf_counter()
        fn, accepts, self.variant_graphs[name] = self.build(actions, skip, generic)
        self.variant_fns[name] = fn
        self.compiles += 1
        if state is not None:
            state.stats.variants_compiled += 1
            state.stats.compile_seconds += time.perf_counter() - start
            if self.compiles > self.config.max_variants:
                state.warn_once("variants", f"duca: {self.compiles} variants compiled for one graph "
                                f"(max_variants={self.config.max_variants}); each distinct pattern of "
                                "per-site actions is a separate compile. Raise max_variants.")
        return fn, accepts

    def _index_examples(self, actions: dict) -> list[torch.Tensor]:
        return [torch.empty(s.shape, dtype=s.dtype) for s in self.layout.inputs(actions) if s.kind == "index"]

    @staticmethod
    def key(actions: dict, skip: bool) -> tuple:
        """What one plan is told apart by: per-site actions with their SUBSET sizes (on a SKIP step,
        only the sites it still computes to refresh their caches)."""
        items = sorted(actions.items())
        return (skip, tuple(items) if not skip else tuple((n, a) for n, a in items if a == "compute"))

    @staticmethod
    def pattern(key: tuple) -> tuple:
        """A plan's key with every SUBSET size replaced by "subset": what one compile serves."""
        skip, items = key
        return (skip, tuple((name, SUBSET if isinstance(a, int) else a) for name, a in items))

    # -- one call -------------------------------------------------------------------------------
    def _shape_key(self, args) -> tuple:
        return shape_key(args, self.user_indices)

    def piece(self, state) -> Piece:
        piece = state.pieces.get(self)
        if piece is None:
            piece = state.pieces[self] = Piece()
        return piece

    def __call__(self, *args):
        st = self.resolve(args)
        piece = self.piece(st)
        note_shapes(st, id(args[self.resolve.anchor_index]), self._shape_key(args))
        i = self.timestep_index
        tracked = st.advance_piece((lambda: st.read_timestep(args[i])) if i is not None else None)
        slot = piece.slot(st.slot, self)
        if not tracked:
            st.stats.fallback_calls += 1
            st.warn_once("untracked", "duca: this graph has no timestep input and no duca_compile.sampling() "
                         "context is active, so every call runs FULL (no caching)")
        if not tracked or slot.epoch != st.epoch:   # nothing valid to reuse yet in this request
            p = self.planned(None, None)
        else:
            p = self.planned(st.step, st.num_steps)
        if slot.epoch != st.epoch:
            slot.taylor.reset()
            slot.clusters.clear()
        st.last_indices, st.last_assign = {}, {}
        extra = self._inputs(st, slot, p.actions, p.key)
        st.last_plan, st.last_actions, st.last_skip = p.plan, p.actions, p.skip
        out = self.variant(p.actions, p.skip, p.key, st)(*args, *slot.caches, *extra)
        if self.fallbacks:
            st.note_fallbacks(self.fallbacks)       # the graph's, and any this call's compile found
        piece.variant_calls[p.key] += 1
        for name in p.computed:
            st.selector.full(name)             # every token of a computed site is fresh again
        if p.plan.mode is Mode.FULL:
            slot.epoch = st.epoch
            if self.layout.propagation is not None:
                self._cluster(st, slot, piece)
        self._count(st, p)
        return out

    def _inputs(self, st, slot: _Slot, actions: dict, key: tuple, names: dict | None = None) -> list[torch.Tensor]:
        """The per-call inputs of plan ``key``, recorded in ``st.last_indices`` / ``last_assign``
        under the model's site names (``names``: the graph's -> the model's, when they differ)."""
        out = []
        specs = self.input_specs.get(key)
        if specs is None:
            specs = self.input_specs[key] = self.layout.inputs(actions)
        indices = self._indices(st, slot, [s for s in specs if s.kind == "index"], names)
        for spec in specs:
            if spec.kind == "taylor_coef":
                coef, w = slot.taylor.tables(actions, st.step, spec.device)
                out.append(coef)
            elif spec.kind == "taylor_w":
                out.append(w)
            elif spec.kind == "index":
                st.last_indices[names[spec.site] if names else spec.site] = indices[spec.site]
                out.append(indices[spec.site])
            else:                              # "assign": the slot's cluster of every token
                assign = slot.clusters[self.sites[spec.site].tokens[0]][0]
                st.last_assign[names[spec.site] if names else spec.site] = assign
                out.append(assign)
        return out

    def _indices(self, st, slot: _Slot, specs: list, names: dict | None = None) -> dict[str, torch.Tensor]:
        """Per SUBSET site its ``[batch, k]`` indices: ClusCa's cluster representatives, or the
        tokens the selector picks for every site of the call at once (selection state is kept
        under the model's site names)."""
        if not specs:
            return {}
        if self.layout.propagation is not None:
            return {s.site: cluster_representatives(slot.clusters[self.sites[s.site].tokens[0]][0], s.shape[1],
                                                    st.generator(torch.device(s.device))) for s in specs}
        requests = []
        for spec in specs:
            site = self.sites[spec.site]
            score = slot.by_key.get(vnorm_key(site.block, site.tokens[0])) if self.layout.value_norms else None
            requests.append((names[spec.site] if names else spec.site, spec.shape[0], site.tokens[0], spec.shape[1],
                             score))
        return dict(zip((s.site for s in specs), st.select_tokens(requests, specs[0].device)))

    def _cluster(self, st, slot: _Slot, piece: Piece) -> None:
        stack = [slot.by_key[f"stack:{i}"] for i in range(len(self.sitemap.stack_outputs))]
        piece.cold_clusterings += self.cluster_into(st, slot.clusters, stack, self.sitemap.sites,
                                                    lambda site: (slot.by_key, site.name))

    def cluster_into(self, st, clusters: dict, stack: list, sites, caches_of) -> bool:
        """After a FULL step: k-means per token count, on the stream after the last token-wise site
        with that many tokens (cached on FULL: DiT's last block output; Flux's image and text streams
        after the last double block), else the hidden state leaving the stack with that many tokens,
        else that site's output. ``caches_of(site)``: (the caches of the graph that ran the site,
        the site's name there). The first clustering of a slot starts from random
        tokens and runs ``kmeans_cold_iters`` (returns True then); later ones from the last centroids."""
        config = self.config
        cold = not clusters
        for tokens, last in sorted(last_token_wise(sites).items()):
            caches, name = caches_of(last)
            source = caches.get(cluster_key(tokens))
            if source is None:
                source = next((t for t in stack if t.ndim == 3 and t.shape[1] == tokens), None)
            if source is None:
                source = caches[order_key(name, 0)]
            k = min(config.clusters, tokens)
            previous = clusters.get(tokens)
            iters = config.kmeans_cold_iters if previous is None else config.kmeans_iters
            clusters[tokens] = kmeans_l1(source, k, iters,
                                              init=previous[1] if previous is not None else None,
                                              generator=st.generator(source.device))
        return cold

    def _count(self, st, p: _Planned, model_call: bool = True) -> None:
        count_call(st, p, model_call)


def shape_key(args, indices) -> tuple:
    """What the user inputs at ``indices`` look like: a change means other caches."""
    return tuple((tuple(args[i].shape), args[i].dtype) if isinstance(args[i], torch.Tensor) else args[i]
                 for i in indices)


def note_shapes(st, anchor: int, key: tuple) -> None:
    """Record the input shapes of the graph piece ``anchor``; other shapes than last time start a
    new epoch (never mix caches of two shapes)."""
    if st.shape_keys.get(anchor, key) != key:
        st.stats.shape_resets += 1
        st.epoch += 1
    st.shape_keys[anchor] = key


def count_call(st, p: _Planned, model_call: bool = True) -> None:
    """Add one call's stats; ``model_call``: it is a model call (a block graph's call is one only
    at the model call's first block), else only its tokens and hits count."""
    s = st.stats
    if model_call:
        s.calls += 1
        s.steps[p.plan.mode.value] += 1
    s.tokens_total += p.tokens_total
    s.tokens_computed += p.tokens_computed
    s.cache_hits += p.cache_hits
    s.block_hits.update(p.block_hits)
