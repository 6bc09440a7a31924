"""``python -m benchmarks subset_k``: one SUBSET compile for every k (k symbolic) against one
compile per k (static), the measurement behind ``GraphRunner.variant``'s design.

Per model size, the SUBSET variant with every token-wise site at k tokens: compile seconds (cold
Inductor cache) and the per-call time of the variant itself (median of ``calls`` after warm-up,
the candidates' calls interleaved) for the static compile at k, the one symbolic compile serving
every k, and the static compile at k's bucket on a bucket-sized selection (the other design: k
rounded up to a bucket, one static compile per bucket and per-site bucket tuple).
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch

import duca_compile
from duca_compile import ScriptedConfig
from duca_compile.runtime import state_of

from .speed import _model

__all__ = ["Row", "run", "BUCKETS"]

BUCKETS = (16, 32, 64, 128, 256)      # a power-of-two bucketing of k, for the comparison


@dataclass
class Row:
    size: str
    k: int
    static_ms: float
    symbolic_ms: float
    ratio: float               # symbolic / static per call
    bucket: int                # the power-of-two bucket k would round up to
    bucket_ratio: float | None # the bucket's static time / k's static time (None: not measured)
    static_compile_s: float
    symbolic_compile_s: float  # once, for every k


def _captured_call(size: str, ratio: float = 0.3):
    """Compile ``size`` with SUBSET steps through duca and capture one SUBSET call's full input list."""
    model = _model(size, "cpu")
    torch._dynamo.reset()
    config = ScriptedConfig(modes=("full", "subset"), ratio=ratio)
    fast = torch.compile(model, backend=duca_compile.duca_backend(config, inner="eager"), fullgraph=True,
                         dynamic=False)
    c = model.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    y = torch.arange(2)
    seen = {}
    with duca_compile.sampling(fast, num_steps=2):
        for t in (900, 800):
            if t == 800:
                runner, _ = state_of(fast).graphs()[0]
                _, actions, skip = runner.plan_step(1, 2)
                key = runner.key(actions, skip)
                real = runner.variant(actions, skip, key)
                runner.by_plan[key] = lambda *a: (seen.setdefault("args", a), real(*a))[1]
            fast(x, timestep=torch.full((2,), float(t)), class_labels=y)
    return runner, actions, seen["args"]


def _with_k(runner, actions, args, k: int):
    """``args`` with every SUBSET index input replaced by a [batch, k] random selection."""
    actions = {n: (k if isinstance(a, int) else a) for n, a in actions.items()}
    specs = runner.layout.inputs(actions)
    first = len(args) - len(specs)
    out = list(args)
    g = torch.Generator().manual_seed(k)
    for j, s in enumerate(specs):
        if s.kind == "index":
            n = runner.sites[s.site].tokens[0]
            out[first + j] = torch.rand(s.shape[0], n, generator=g).argsort(1)[:, :k].contiguous()
    return actions, out


def _interleaved_ms(runs: list, calls: int) -> list[float]:
    """Median ms per call of each ``(fn, args)`` of ``runs``, their calls interleaved (a shared
    machine's drift then hits them alike)."""
    for fn, args in runs:
        for _ in range(3):
            fn(*args)
    times = [[] for _ in runs]
    for _ in range(calls):
        for (fn, args), t in zip(runs, times):
            start = time.perf_counter()
            fn(*args)
            t.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def run(sizes, ks, calls: int = 20, progress=lambda it, **kw: it) -> list[Row]:
    from torch._inductor.utils import fresh_cache

    from duca_compile.settings import inner_compiler

    compiler = inner_compiler("inductor", None, {})
    rows = []
    for size in progress(list(sizes), desc="sizes"):
        runner, actions, args = _captured_call(size)
        tokens = min(s.tokens[0] for s in runner.sitemap.sites if s.subsettable)
        wanted = sorted({k for k in ks if k <= tokens} | {_bucket(k) for k in ks if _bucket(k) <= tokens})
        compiled, compile_s = {}, {}
        if not rows:              # the process's first compile also loads Inductor itself: not timed
            with fresh_cache():
                _compile(runner, compiler, _with_k(runner, actions, args, wanted[0])[0], generic=False)
        for k in progress(wanted, desc=f"{size}: static k"):
            with fresh_cache():
                start = time.perf_counter()
                compiled[k] = _compile(runner, compiler, _with_k(runner, actions, args, k)[0], generic=False)
                compile_s[k] = time.perf_counter() - start
        with fresh_cache():
            start = time.perf_counter()
            symbolic = _compile(runner, compiler, _with_k(runner, actions, args, ks[0])[0], generic=True)
            symbolic_s = time.perf_counter() - start
        for k in (k for k in ks if k in compiled):
            b = _bucket(k)
            kargs = _with_k(runner, actions, args, k)[1]
            runs = [(compiled[k], kargs), (symbolic, kargs)]
            if b in compiled and b != k:
                runs.append((compiled[b], _with_k(runner, actions, args, b)[1]))
            ms = _interleaved_ms(runs, calls)
            bucket_ms = ms[2] if len(ms) > 2 else (ms[0] if b == k else None)
            rows.append(Row(size, k, ms[0], ms[1], ms[1] / ms[0], b,
                            bucket_ms / ms[0] if bucket_ms is not None else None, compile_s[k], symbolic_s))
    return rows


def _bucket(k: int) -> int:
    return next((b for b in BUCKETS if b >= k), k)


def _compile(runner, compiler, actions, generic: bool):
    """The SUBSET variant for ``actions`` compiled by ``compiler`` (the runner's graph and passes)."""
    build = copy.copy(runner.build)
    build.compile_variant = compiler
    return build(actions, False, generic)[0]
