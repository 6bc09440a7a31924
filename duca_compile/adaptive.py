"""The runner of adaptive caching (``AdaptiveConfig``): per call, run the compiled HEAD graph, read
its two decision means once on the host (only where the threshold decides; under context
parallelism HEAD sums them over the ranks, so every rank decides alike), then run COMPUTE or REUSE.

Three graphs, built and compiled together at the graph's first call (``passes.split_head``), serve
every step: Dynamo sees one graph and one guard set, the choice lives here, outside traced code,
so ``fullgraph=True`` holds and nothing recompiles. Caches are per model and per slot (a separate
cond / uncond pass decides for itself, as cache-dit's separate-CFG does; a batched CFG call takes
one decision for the whole batch, as every peer does).
"""
from __future__ import annotations

import time
from collections import Counter

import torch

from .passes.split_head import HeadSplit, build_head, build_rest
from .policies import Mode, StepPlan
from .policies.adaptive import Counters, Forecast, decide, forecast_basis, forecast_terms, record
from .runner import count_call, derive, note_shapes, shape_key
from .runtime import CompiledCallable

__all__ = ["AdaptiveRunner", "decisions"]

GRAPHS = ("HEAD", "COMPUTE", "REUSE")


class _Slot:
    def __init__(self, split: HeadSplit, orders: int, basis: tuple = ("taylor", 1.0)):
        def zeros(spec):
            return torch.zeros(spec[0], dtype=spec[1], device=spec[2])

        self.crossing = [zeros(split.specs[n]) for n in split.crossing]
        self.residuals = [zeros(split.specs[split.residual[0]]) for _ in range(2)]   # [current, previous]
        # per pair: the middle residual, then its finite differences
        self.middle = [zeros(split.specs[h]) for _, h in split.pairs for _ in range(orders + 1)]
        self.device = split.specs[split.residual[0]][2]
        self.epoch = -1                # request whose computed step filled these caches
        self.orders, self.basis = orders, basis
        self.start()

    def start(self) -> None:
        """A new request: fresh counters and forecast anchors."""
        self.counters = Counters()
        self.forecast = Forecast(self.orders, self.basis) if self.orders else None

    def tensors(self):
        return [*self.crossing, *self.residuals, *self.middle]


class AdaptivePiece:
    """One model's share of an adaptive graph: cache slots, calls per graph, the request's decisions."""

    names = None

    def __init__(self):
        self.slots: dict[int, _Slot] = {}
        self.variant_calls: Counter = Counter()        # "COMPUTE" / "REUSE" -> model calls
        self.decisions: list[dict] = []                # this request's: step, slot, diff, computed
        self.cold_clusterings = 0

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.slots.values() for t in s.tensors())


class AdaptiveRunner(CompiledCallable):
    def __init__(self, resolve, settings, sitemap, split: HeadSplit, gm, example_inputs, fake_mode, compile_variant,
                 timestep_index, user_indices, fallbacks=()):
        self.resolve, self.settings, self.config = resolve, settings, settings.config
        self.sitemap, self.split, self.gm = sitemap, split, gm
        self.example_inputs, self.fake_mode, self.compile_variant = example_inputs, fake_mode, compile_variant
        self.timestep_index, self.user_indices = timestep_index, user_indices
        self.fallbacks = list(fallbacks)
        self.variant_graphs: dict[str, torch.fx.GraphModule] = {}
        self.fns: dict[str, object] = {}
        self.compiles = 0
        self.orders = forecast_terms(self.config)
        middle = set(split.middle)
        computed = {s.name: "compute" for s in sitemap.sites}
        reused = {s.name: "reuse" if s.block in middle else "compute" for s in sitemap.sites}
        self.planned = {
            True: derive(StepPlan(Mode.FULL), computed, False, sitemap.sites, (False, ())),
            False: derive(StepPlan(Mode.SKIP), reused, True, sitemap.sites, (True, ())),
        }

    # -- building -------------------------------------------------------------------------------
    def _build(self, st) -> None:
        start = time.perf_counter()
        s, fm = self.split, self.fake_mode
        group = None
        if st.selector.world > 1:              # context parallelism: the decision of the whole sequence
            pg = st.selector.group if st.selector.group is not None else torch.distributed.group.WORLD
            group = pg.group_name
        graphs = {"HEAD": build_head(self.gm, s, fm, group),
                  "COMPUTE": build_rest(self.gm, s, False, self.orders, fm, self.config.forecast),
                  "REUSE": build_rest(self.gm, s, True, self.orders, fm, self.config.forecast)}
        for name, g in graphs.items():
            self.variant_graphs[name] = g
            self.fns[name] = self.compile_variant.compile_generic(g, self.examples(name), [])[0]
            self.compiles += 1
            st.stats.variants_compiled += 1
        st.stats.compile_seconds += time.perf_counter() - start

    def cache_specs(self, name: str) -> list[tuple]:
        """(shape, dtype, device) of the caches graph ``name`` takes after the graph's own inputs."""
        s = self.split
        if name == "HEAD":
            own = [s.specs[s.residual[0]]] * 2
        else:
            own = [s.specs[h] for _, h in s.pairs for _ in range(self.orders + 1)]
            if self.orders:
                size = self.orders + 1 if name == "REUSE" else self.orders
                own.append(((size,), torch.float32, s.specs[s.residual[0]][2]))
        return [*(s.specs[n] for n in s.crossing), *own]

    def examples(self, name: str) -> list:
        """Example inputs of one of the three graphs: the graph's own, then its caches' specs
        (compiled on fake tensors: no cache-sized allocation while compiling)."""
        from .settings import TensorSpec

        return [*self.example_inputs, *(TensorSpec(sh, dt, torch.device(dev)) for sh, dt, dev in self.cache_specs(name))]

    # -- one call -------------------------------------------------------------------------------
    def piece(self, st) -> AdaptivePiece:
        piece = st.pieces.get(self)
        if piece is None:
            piece = st.pieces[self] = AdaptivePiece()
        return piece

    def __call__(self, *args):
        st = self.resolve(args)
        piece = self.piece(st)
        note_shapes(st, id(args[self.resolve.anchor_index]), shape_key(args, self.user_indices))
        i = self.timestep_index
        tracked = st.advance_piece((lambda: st.read_timestep(args[i])) if i is not None else None)
        if not self.fns:
            self._build(st)
        if piece.decisions and piece.decisions[-1]["epoch"] != st.epoch:
            piece.decisions = []               # a new request (or new shapes): its own decisions
        if st.slot not in piece.slots:
            piece.slots[st.slot] = _Slot(self.split, self.orders, forecast_basis(self.config))
        slot = piece.slots[st.slot]
        if not tracked:
            st.stats.fallback_calls += 1
            st.warn_once("untracked", "duca: this graph has no timestep input and no duca_compile.sampling() "
                         "context is active, so every call runs FULL (no caching)")
        fresh = not tracked or slot.epoch != st.epoch
        if slot.epoch != st.epoch:
            slot.start()
        means = self.fns["HEAD"](*args, *slot.crossing, *slot.residuals)[0]
        compute, value = decide(self.config, st.step, fresh, slot.counters, lambda: self._read(st, means),
                                st.num_steps)
        record(slot.counters, compute, value)
        name = "COMPUTE" if compute else "REUSE"
        table = []
        if slot.forecast is not None:
            f = slot.forecast
            values = f.weights(st.step) if compute else f.coefficients(st.step)
            table = [torch.tensor(values, dtype=torch.float32, device=slot.device)]
        out = self.fns[name](*args, *slot.crossing, *slot.middle, *table)
        if compute:
            slot.residuals.reverse()           # this step's residual is the next steps' reference
            slot.epoch = st.epoch
        piece.variant_calls[name] += 1
        piece.decisions.append({"epoch": st.epoch, "step": st.step, "slot": st.slot, "diff": value,
                                "computed": compute})
        self._count(st, self.planned[compute])
        return out

    @staticmethod
    def _read(st, means: torch.Tensor) -> float:
        """The decision's diff: the one host read (of both means at once, already summed over the
        ranks under context parallelism)."""
        st.stats.decision_reads += 1
        change, scale = means.tolist()
        return change / scale if scale else float("inf")

    def _count(self, st, p) -> None:
        st.last_plan, st.last_actions, st.last_skip = p.plan, p.actions, p.skip
        st.last_indices, st.last_assign = {}, {}
        if self.fallbacks:
            st.note_fallbacks(self.fallbacks)
        count_call(st, p)

    # -- accounting -----------------------------------------------------------------------------
    def flops(self, piece: AdaptivePiece) -> dict:
        """``runner_flops`` for the three graphs: HEAD + COMPUTE or HEAD + REUSE per call, against
        the original graph per call."""
        from .flops import graph_flops

        calls = {k: n for k, n in piece.variant_calls.items() if n}
        if not calls:
            return {"flops_run": 0, "flops_full": 0, "flops_clustering": 0, "tokens_per_site": {}}
        if not self.fns:
            return {"flops_run": 0, "flops_full": 0, "flops_clustering": 0, "tokens_per_site": {}}
        head = graph_flops(self.variant_graphs["HEAD"])
        run = sum(n * (head + graph_flops(self.variant_graphs[k])) for k, n in calls.items())
        full = graph_flops(self.gm) * sum(calls.values())
        tokens = Counter()
        for computed, p in self.planned.items():
            n = calls.get("COMPUTE" if computed else "REUSE", 0)
            for site in self.sitemap.sites:
                tokens[site.name] += n * (sum(site.tokens) if p.actions[site.name] == "compute" else 0)
        return {"flops_run": run, "flops_full": full, "flops_clustering": 0,
                "tokens_per_site": {s.name: tokens[s.name] for s in self.sitemap.sites}}


def decisions(model) -> list[dict]:
    """The adaptive decisions of ``model``'s last request, in call order: ``step``, ``slot``,
    ``diff`` (the head residual's relative change, None where it was not read: warm-up or a limit
    decided) and ``computed``."""
    from .report import _require

    st = _require(model)
    made = [d for _, piece in st.graphs() for d in getattr(piece, "decisions", ())]
    if st.regional is not None and st.regional.adaptive is not None:
        made += st.regional.adaptive.decisions
    return [{k: d[k] for k in ("step", "slot", "diff", "computed")} for d in made]
