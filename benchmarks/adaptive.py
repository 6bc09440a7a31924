"""``python -m benchmarks adaptive [--quick]``: adaptive caching (``AdaptiveConfig``) on the trained
digits DiT against diffusers' FirstBlockCache and cache-dit's DBCache (with and without its
TaylorSeer calibrator), each pair at the same settings: the rules are the same, so the computed
steps are the same (the tests check it step for step; here each row reports its own count). Also
the compute target, and FORA at about the same number of computed steps (a fixed schedule).

Every row is its own copy of the model, compiled the way its users compile it: duca with
``fullgraph=True`` (three graphs behind one Dynamo graph), the peers with plain ``torch.compile``
(their decisions break the graph). The first request of each row is its warm-up (compile time,
minus a timed request); then the timed requests run in turns, one per row per turn, so machine
noise hits every row alike. PSNR is against the uncached samples (same noise, same labels).
"""
from __future__ import annotations

import copy
import statistics
import time
import types
from dataclasses import dataclass

import torch

import duca_compile
from duca_compile import AdaptiveConfig, FORAConfig
from duca_compile.adaptive import decisions
from duca_compile.runtime import state_of

from .metrics import psnr
from .peers import CacheDiT, FirstBlockCache, _warmup
from .sampling import request_starter, sample, starts

__all__ = ["Setup", "QUICK", "STANDARD", "HELDOUT", "Row", "HeldOutRow", "rows_of", "run", "heldout"]


@dataclass(frozen=True)
class Setup:
    batch: int            # samples per request
    turns: int            # timed requests per row, after the warm-up one
    steps: int            # DDIM steps
    guidance: float
    inner: str            # "inductor" | "eager"


QUICK = Setup(batch=4, turns=1, steps=8, guidance=1.5, inner="eager")
STANDARD = Setup(batch=20, turns=3, steps=50, guidance=1.5, inner="inductor")
# the held-out model (DiT-B-like, random weights: its samples mean nothing, PSNR against its own
# uncached run), eager, one request per row: do the settings (and the target) transfer?
HELDOUT = Setup(batch=2, turns=0, steps=50, guidance=1.5, inner="eager")


@dataclass
class Row:
    method: str
    knob: str
    computed: float       # computed steps per request (mean over the timed requests)
    psnr: float
    flop_ratio: float
    seconds: float        # median timed request
    speedup: float        # plain torch.compile's median request / this row's
    compile_seconds: float
    host_reads: float = float("nan")   # duca: decision reads per request (the peers read as often: not counted)
    notes: str = ""


def rows_of(steps: int) -> list[tuple[str, str, object]]:
    """(method, knob, config or peer): each duca row next to the peer with the same rule and settings.
    The thresholds are the fidelity benchmark's peer settings (comparable compute on this model)."""
    w = _warmup(steps)
    dbcache = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=w)
    return [
        ("duca adaptive", "F1B0 thr 0.08", AdaptiveConfig(threshold=0.08)),
        ("diffusers FirstBlockCache", "thr 0.08", FirstBlockCache("diffusers FirstBlockCache", "diffusers",
                                                                  {"threshold": 0.08}, threshold=0.08)),
        ("duca adaptive", f"F1B0 thr 0.24 W={w}", AdaptiveConfig(threshold=0.24, warmup=w)),
        ("cache-dit DBCache", f"F1B0 thr 0.24 W={w}", CacheDiT("cache-dit DBCache", "cache-dit", {},
                                                              config={**dbcache, "residual_diff_threshold": 0.24})),
        ("duca adaptive + TaylorSeer", f"F1B0 thr 0.12 W={w} O=1",
         AdaptiveConfig(threshold=0.12, warmup=w, forecast="taylorseer")),
        ("cache-dit DBCache + TaylorSeer", f"F1B0 thr 0.12 W={w} O=1",
         CacheDiT("cache-dit DBCache + TaylorSeer", "cache-dit", {},
                  config={**dbcache, "residual_diff_threshold": 0.12}, taylorseer_order=1)),
        ("duca adaptive, target", "target 0.4", AdaptiveConfig(target=0.4)),
        ("duca adaptive + TaylorSeer, target", f"target 0.4 W={w} O=1",
         AdaptiveConfig(target=0.4, warmup=w, forecast="taylorseer")),
        ("FORA (fixed schedule)", "N=3", FORAConfig(interval=3)),
    ]


def _denoiser(fn):
    return lambda x, t, y: fn(x, timestep=t, class_labels=y).sample


class _Runner:
    """One row: its model copy, how to run one request, and what it measured."""

    def __init__(self, method, knob, what, model, setup: Setup):
        self.method, self.knob, self.what, self.setup = method, knob, what, setup
        self.model = _own_code(copy.deepcopy(model))
        self.times, self.computed, self.reads, self.out = [], [], [], None
        self.peer = what if not isinstance(what, (duca_compile.CacheConfig, type(None))) else None
        backend = "inductor" if setup.inner == "inductor" else "eager"       # eager: Dynamo all the same
        if self.peer is not None:
            self.peer.apply(self.model, setup.steps)
            self.fast = torch.compile(self.model, backend=backend, dynamic=False)
            self._block_calls = _counter(self.model)
        elif what is None:
            self.fast = torch.compile(self.model, backend=backend, dynamic=False)
        else:
            self.fast = torch.compile(self.model, backend=duca_compile.duca_backend(what, inner=setup.inner),
                                      fullgraph=True, dynamic=False)

    def request(self, noise, labels) -> float:
        s = self.setup
        if self.peer is not None:
            self.peer.new_request(self.model, s.steps)
            self._block_calls.clear()
            call = lambda x, t, y: self.peer.call(self.fast, x, timestep=t, class_labels=y).sample  # noqa: E731
            start = time.perf_counter()
            self.out = sample(call, noise, labels, s.steps, s.guidance)
            seconds = time.perf_counter() - start
            self.computed.append(self._block_calls["last"])      # steps whose last block ran
            return seconds
        if self.what is None:
            start = time.perf_counter()
            self.out = sample(_denoiser(self.fast), noise, labels, s.steps, s.guidance)
            self.computed.append(s.steps)
            return time.perf_counter() - start
        st = state_of(self.fast) if self.out is not None else None
        reads, full = (st.stats.decision_reads, st.stats.steps["full"]) if st is not None else (0, 0)
        with request_starter(self.fast, s.steps) as before:
            before()
            start = time.perf_counter()
            self.out = sample(_denoiser(self.fast), noise, labels, s.steps, s.guidance)
            seconds = time.perf_counter() - start
        st = state_of(self.fast)
        self.reads.append(st.stats.decision_reads - reads)
        self.computed.append(st.stats.steps["full"] - full)     # a computed step runs FULL (adaptive: COMPUTE)
        if isinstance(self.what, AdaptiveConfig):
            assert self.computed[-1] == sum(d["computed"] for d in decisions(self.fast)), duca_compile.explain(self.fast)
        return seconds


def _own_code(model):
    """The row's own copies of the forward code of the model and of its blocks, as instance
    attributes. Dynamo keeps its state per code object (compiled entries, and the mark that makes
    it run a frame eagerly from then on, which a peer's hooks can set on DiT's forward): rows
    alive side by side in one process must not share it."""
    for m in [model, *model.transformer_blocks]:
        f = type(m).forward
        code = f.__code__.replace()          # an equal but distinct code object
        own = types.FunctionType(code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        own.__kwdefaults__, own.__wrapped__ = f.__kwdefaults__, f
        m.forward = types.MethodType(own, m)
    return model


def _counter(model):
    """Counts the calls of the last block's self-attention: a peer's computed steps (cached steps
    skip it; diffusers' FirstBlockCache still calls the skipped blocks, whose hooks return their
    inputs, so the block itself would count every step)."""
    from collections import Counter

    calls = Counter()
    model.transformer_blocks[-1].attn1.register_forward_pre_hook(lambda m, a: calls.update(["last"]))
    return calls


def run(setup: Setup, model, progress=lambda it, **kw: it) -> list[Row]:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)   # a model per row
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    noise, labels = starts(setup.batch)
    runners = [_Runner("uncached", "-", None, model, setup)]
    runners += [_Runner(m, k, w, model, setup) for m, k, w in rows_of(setup.steps)]
    warm = {}
    # duca's rows first: a peer whose hooks make Dynamo give up on a frame of DiT's shared forward
    # code would otherwise have the later rows run that code eagerly
    for r in progress(sorted(runners, key=lambda r: r.peer is not None), desc="warm-up"):
        warm[r] = r.request(noise, labels)
        r.computed.clear()
        r.reads.clear()
    for _ in progress(range(setup.turns), desc="timed turns"):
        for r in runners:
            r.times.append(r.request(noise, labels))
    reference = runners[0].out
    base = statistics.median(runners[0].times)
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        computed = statistics.mean(r.computed)
        flop_ratio = _flop_ratio(r, noise, labels) if r.what is not None else 1.0
        rows.append(Row(r.method, r.knob, computed, psnr(r.out, reference), flop_ratio, med, base / med,
                        max(warm[r] - med, 0.0), statistics.mean(r.reads) if r.reads else float("nan")))
    return rows


def _flop_ratio(r: _Runner, noise, labels) -> float:
    """duca: its graphs' FLOPs over every call so far against the uncached model's; a peer:
    ``FlopCounterMode`` over one eager request of 2 samples with the cache against one without."""
    if r.peer is None:
        return duca_compile.stats(r.fast)["flop_ratio"]
    from torch.utils.flop_counter import FlopCounterMode

    s, n = r.setup, 2
    with FlopCounterMode(display=False) as cached:
        r.peer.new_request(r.model, s.steps)
        sample(lambda x, t, y: r.peer.call(r.model, x, timestep=t, class_labels=y).sample, noise[:n], labels[:n],
               s.steps, s.guidance)
    r.peer.remove(r.model)
    with FlopCounterMode(display=False) as plain:
        sample(_denoiser(r.model), noise[:n], labels[:n], s.steps, s.guidance)
    return cached.get_total_flops() / plain.get_total_flops()


@dataclass
class HeldOutRow:
    method: str
    knob: str
    computed: float
    psnr: float
    flop_ratio: float


def heldout(setup: Setup, model, progress=lambda it, **kw: it) -> list[HeldOutRow]:
    """The same rows on another model, one request each (no timing: eager)."""
    noise, labels = starts(setup.batch, seed=1)
    runners = [_Runner("uncached", "-", None, model, setup)]
    runners += [_Runner(m, k, w, model, setup) for m, k, w in rows_of(setup.steps)]
    for r in progress(runners, desc="held-out"):
        r.request(noise, labels)
    reference = runners[0].out
    return [HeldOutRow(r.method, r.knob, r.computed[-1], psnr(r.out, reference),
                       _flop_ratio(r, noise, labels) if r.what is not None else 1.0) for r in runners]
