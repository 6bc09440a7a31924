"""``python -m benchmarks dispatch``: where a duca call's time goes, per preset, after warm-up.

Per call of a 50-step request on the trained digits DiT (batch 2, Inductor): the whole call as
the sampler sees it, the compiled variant alone (each variant's callable wrapped with a timer) and
the rest, host time outside the variant (Dynamo's guards on the frame plus duca's runner:
step tracking, planning, token selection, stats). Per mode: the variant's own time, as a ratio to
the FULL variant's, next to the FLOPs ratio it should approach.
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

import duca_compile
from duca_compile import presets
from duca_compile.flops import full_key, variant_flops
from duca_compile.runtime import state_of

from .speed import _model

__all__ = ["Row", "run"]


@dataclass
class Row:
    method: str
    mode: str
    calls: int
    call_ms: float          # the whole model call, median
    variant_ms: float       # inside the compiled variant, median
    host_ms: float          # median of (call - variant) per call
    vs_full: float          # this mode's variant time / the FULL variant's
    flops_vs_full: float    # this mode's FLOPs / the FULL variant's


def _timed_variants(runner, sink: list):
    for key, fn in list(runner.by_plan.items()):
        def timed(*a, _fn=fn, _key=key):
            start = time.perf_counter()
            out = _fn(*a)
            sink.append((_key, time.perf_counter() - start))
            return out
        runner.by_plan[key] = timed


def run(methods, steps: int = 50, size: str = "digits (trained)", progress=lambda it, **kw: it) -> list[Row]:
    model = _model(size, "cpu")
    c = model.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(0))
    y = torch.arange(2)
    ts = [torch.full((2,), 999.0 - i * 998.0 / (steps - 1)) for i in range(steps)]
    rows = []
    for method in progress(list(methods), desc="methods"):
        torch._dynamo.reset()
        fast = torch.compile(model, backend=duca_compile.duca_backend(presets("dit-xl-2", method)), fullgraph=True,
                             dynamic=False)
        with duca_compile.sampling(fast, num_steps=steps):      # warm-up request: compiles every variant
            for t in ts:
                fast(x, timestep=t, class_labels=y)
        runner, _ = state_of(fast).graphs()[0]
        sink, per_mode = [], defaultdict(list)
        _timed_variants(runner, sink)
        with duca_compile.sampling(fast, num_steps=steps):
            for t in ts:
                before = len(sink)
                start = time.perf_counter()
                fast(x, timestep=t, class_labels=y)
                total = time.perf_counter() - start
                if len(sink) != before + 1:
                    raise RuntimeError(f"{method}: a call ran a variant the warm-up request did not build")
                key, inside = sink[-1]
                per_mode[state_of(fast).last_plan.mode.value].append((total, inside, key))
        full_ms = statistics.median(i for t, i, _ in per_mode["full"]) * 1000
        full_flops = variant_flops(runner, full_key(runner))
        for mode, calls in per_mode.items():
            variant = statistics.median(i for _, i, _ in calls) * 1000
            flops = statistics.mean(variant_flops(runner, k) for _, _, k in calls)
            rows.append(Row(method, mode, len(calls), statistics.median(t for t, _, _ in calls) * 1000, variant,
                            statistics.median(t - i for t, i, _ in calls) * 1000, variant / full_ms,
                            flops / full_flops))
    return rows
