"""``python -m benchmarks adaptive-cond [--quick]``: the two designs issue 30 asked to measure for
the adaptive decision, side by side in one run.

(a) duca's ``AdaptiveRunner``: HEAD, one host read of the decision's two means, then COMPUTE or REUSE
    (three compiled graphs, the choice made in Python).
(b) ``torch.cond``: the same three graphs (built by duca's passes) traced into one compiled function:
    ``cond(force | mean|r − p| > threshold · mean|p|, COMPUTE, REUSE)``, no host read at all; the
    computed/cached flag of each step stays on the device until the request ends.

(b) is an experiment, not a shipped mode: it takes the threshold and the warm-up (the host knows the
step), not the limits, the target or the forecast, whose counters would have to live on the device.
Requests are timed in turns (one per row per turn), against plain ``torch.compile`` of the same model;
then one more request per row counts the tensor values the host reads (``.item()``, ``bool()``, ...).

What it found on torch 2.13: (b) does not remove the host read. torch runs a ``cond`` by reading its
predicate on the host: eagerly (and under aot_eager) ``if pred:``; in the wrapper Inductor generates,
``if pred.item():``. So (b) reads once per step, warm-up steps included, where (a) reads only on the
steps its threshold decides.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass

import torch

import duca_compile
from duca_compile import AdaptiveConfig
from duca_compile.adaptive import GRAPHS, AdaptiveRunner, _Slot

from .adaptive import _denoiser, _own_code
from .metrics import psnr
from .sampling import request_starter, sample, starts

__all__ = ["CondRunner", "cond_backend", "Setup", "QUICK", "STANDARD", "Row", "run"]


class CondRunner(AdaptiveRunner):
    """Design (b): one compiled function per graph whose ``torch.cond`` picks COMPUTE or REUSE."""

    cond_compiler = "inductor"

    def __call__(self, *args):
        c = self.config
        if (c.max_cached_steps, c.max_consecutive_cached, c.max_accumulated_diff, c.target) != (None,) * 4 \
                or c.forecast != "reuse" or c.warmup_interval != 1:
            raise ValueError("the torch.cond experiment takes threshold and warmup only")
        st = self.resolve(args)
        piece = self.piece(st)
        i = self.timestep_index
        tracked = st.advance_piece((lambda: st.read_timestep(args[i])) if i is not None else None)
        if not self.fns:
            self._build(st)                    # the three graphs (compiled by the inner compiler, unused here)
            self.step_fn = torch.compile(self._step, backend=self.cond_compiler, fullgraph=True, dynamic=False)
            self.flags = {}
        if piece.decisions and piece.decisions[-1]["epoch"] != st.epoch:
            piece.decisions = []
        slot = piece.slots.setdefault(st.slot, _Slot(self.split, 0))
        force = not tracked or slot.epoch != st.epoch or st.step < c.warmup
        flag = self.flags.setdefault((force, slot.device), torch.tensor(force, device=slot.device))
        out, computed = self.step_fn(flag, list(args), slot.crossing, slot.residuals, slot.middle)
        slot.epoch = st.epoch
        piece.decisions.append({"epoch": st.epoch, "step": st.step, "slot": st.slot, "diff": None,
                                "computed": computed})          # a device flag, read after the request
        return out

    def _step(self, force, args, crossing, residuals, middle):
        head, compute, reuse = (self.variant_graphs[k] for k in GRAPHS)
        means = head(*args, *crossing, *residuals)[0]
        computes = force | (means[0] > self.config.threshold * means[1])
        current, previous = residuals

        def on_compute(*ops):
            out = tuple(compute(*args, *crossing, *middle))
            previous.copy_(current)          # (a) swaps the two buffers on the host instead
            return out

        def on_reuse(*ops):
            return tuple(reuse(*args, *crossing, *middle))

        return torch.cond(computes, on_compute, on_reuse, ()), computes


def cond_backend(config: AdaptiveConfig, cond_compiler: str = "inductor"):
    """A backend whose adaptive graphs run as design (b), compiled by ``cond_compiler``."""
    duca = duca_compile.duca_backend(config, inner="eager")

    def backend(gm, example_inputs, **kw):
        runner = duca(gm, example_inputs, **kw)
        if type(runner) is not AdaptiveRunner:
            raise RuntimeError("the torch.cond experiment needs a graph duca cuts for adaptive caching")
        runner.__class__ = CondRunner
        runner.cond_compiler = cond_compiler
        return runner
    return backend


def computed_steps(model) -> list[bool]:
    """The last request's decisions (one read of every device flag, after the request)."""
    from duca_compile.adaptive import decisions

    return [bool(d["computed"]) for d in decisions(model)]


@dataclass(frozen=True)
class Setup:
    batch: int
    turns: int
    steps: int
    guidance: float
    compiler: str


QUICK = Setup(batch=2, turns=1, steps=8, guidance=1.5, compiler="aot_eager")
STANDARD = Setup(batch=20, turns=3, steps=50, guidance=1.5, compiler="inductor")


@dataclass
class Row:
    design: str
    knob: str
    computed: float
    psnr: float
    seconds: float
    speedup: float        # plain torch.compile's median request / this row's
    compile_seconds: float
    host_reads: int       # tensor values read on the host in one request (counted apart from the timing)


def rows_of(steps: int) -> list[tuple[str, str, AdaptiveConfig]]:
    return [(design, f"thr {t} W={w}", AdaptiveConfig(threshold=t, warmup=w))
            for t, w in ((0.08, 0), (0.24, 6 if steps >= 20 else 1)) for design in ("(a) host read", "(b) torch.cond")]


def run(setup: Setup, model, progress=lambda it, **kw: it) -> list[Row]:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    noise, labels = starts(setup.batch)
    rows = [("plain torch.compile", "-", None), *rows_of(setup.steps)]
    fns = []
    for design, _, config in rows:
        m = _own_code(copy.deepcopy(model))
        if config is None:
            fns.append(torch.compile(m, backend=setup.compiler, dynamic=False))
        elif design.startswith("(a)"):
            fns.append(torch.compile(m, backend=duca_compile.duca_backend(config, inner=setup.compiler),
                                     fullgraph=True, dynamic=False))
        else:
            fns.append(torch.compile(m, backend=cond_backend(config, setup.compiler), fullgraph=True, dynamic=False))
    times, warm, outs, computed = ([[] for _ in rows] for _ in range(4))

    def request(j, record=True):
        fast, cached = fns[j], rows[j][2] is not None
        with request_starter(fast, setup.steps) if cached else contextlib.nullcontext() as start:
            if cached:
                start()
            t0 = time.perf_counter()
            out = sample(_denoiser(fast), noise, labels, setup.steps, setup.guidance)
            seconds = time.perf_counter() - t0
        outs[j].append(out)
        if cached and record:            # reads (b)'s flags: not in a request whose reads are counted
            computed[j].append(sum(computed_steps(fast)))
        return seconds

    for j in progress(range(len(rows)), desc="warm-up"):
        warm[j].append(request(j))
    for _ in progress(range(setup.turns), desc="timed turns"):
        for j in range(len(rows)):
            times[j].append(request(j))
    counted = [count_reads(lambda: request(j, record=False)) for j in range(len(rows))]
    base = statistics.median(times[0])
    out = []
    for j, (design, knob, config) in enumerate(rows):
        med = statistics.median(times[j])
        out.append(Row(design, knob, statistics.mean(computed[j][1:] or computed[j]) if config else setup.steps,
                       psnr(outs[j][-1], outs[0][-1]), med, base / med, max(warm[j][0] - med, 0.0), counted[j]))
    return out



def count_reads(fn) -> int:
    """How many tensor values the host reads while ``fn()`` runs."""
    names = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
    originals, reads = {n: getattr(torch.Tensor, n) for n in names}, [0]

    def counting(original):
        def read(self, *args):
            reads[0] += 1
            return original(self, *args)
        return read
    try:
        for n, f in originals.items():
            setattr(torch.Tensor, n, counting(f))
        fn()
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
    return reads[0]
