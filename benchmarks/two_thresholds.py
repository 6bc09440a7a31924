"""``python -m benchmarks two-thresholds [--quick]``: let the adaptive decision choose between DuCa's
three kinds of step, and see whether that moves the quality / compute front (issue 30, item 6).

Each step, block 0's residual is compared with the one of the last full step, as FirstBlockCache
and DBCache compare them (``diff = mean|r − p| / mean|p|``), and two thresholds pick the step:
``diff > high`` full, ``low < diff ≤ high`` conservative (DuCa's ToCa step: every site past block 0
recomputes a ``ratio`` of its tokens, chosen at random, the rest reused), ``diff ≤ low`` aggressive
(every site past block 0 reused). Block 0 always computes, so the diff costs nothing extra.

It is an experiment, not a shipped method: each step's diff is taken from an eager copy of the model
(prefix + block 0, the same input the compiled model gets), then the step's mode is handed to duca's
own FULL / SUBSET / REUSE variants (compiled with the eager inner compiler), whose FLOPs ``stats()``
counts. The rows it is compared with run through the same machinery: one threshold choosing full or
aggressive, one threshold choosing full or conservative, and the fixed DuCa (the fidelity benchmark's constant-ratio rows) and FORA schedules. PSNR
is against the uncached samples (same noise, same labels); no wall-clock is measured.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

import duca_compile
from duca_compile import FORAConfig, presets
from duca_compile.policies.base import Mode, StepPlan, register_policy
from duca_compile.policies.scripted import ScriptedConfig, ScriptedPolicy

from .metrics import psnr
from .sampling import request_starter, sample, starts

__all__ = ["Setup", "QUICK", "STANDARD", "Row", "run"]


@dataclass(frozen=True)
class Setup:
    batch: int
    steps: int
    guidance: float
    ratio: float          # conservative steps: tokens recomputed per site


QUICK = Setup(batch=2, steps=8, guidance=1.5, ratio=0.3)
STANDARD = Setup(batch=10, steps=50, guidance=1.5, ratio=0.3)


@dataclass(frozen=True)
class OnlineConfig(ScriptedConfig):
    """The experiment's policy: each step's mode is set by ``decider`` before the step's call."""

    decider: object = field(default=None, compare=False)


@register_policy(OnlineConfig)
class OnlinePolicy(ScriptedPolicy):
    def plan(self, step, num_steps=None):
        mode = Mode(self.config.decider.mode)
        return StepPlan(mode, self.config.ratio if mode is Mode.SUBSET else 0.0)


class Decider:
    """Full above ``high``, conservative above ``low``, else aggressive; ``p`` moves on full steps."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high
        self.mode, self.previous, self.counts = "full", None, {"full": 0, "subset": 0, "reuse": 0}

    def decide(self, residual: torch.Tensor) -> None:
        if self.previous is None:
            self.mode = "full"
        else:
            p = self.previous
            diff = float((residual - p).abs().mean() / p.abs().mean())
            self.mode = "full" if diff > self.high else "subset" if diff > self.low else "reuse"
        if self.mode == "full":
            self.previous = residual
        self.counts[self.mode] += 1


class _Stop(Exception):
    pass


def head_residual(twin, x, t, y) -> torch.Tensor:
    """Block 0's output minus its input for this call, in float32 (the model stops after block 0)."""
    block, got = twin.transformer_blocks[0], {}

    def before(module, args, kwargs):
        got["in"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def after(module, args, kwargs, out):
        got["out"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    hooks = [block.register_forward_pre_hook(before, with_kwargs=True),
             block.register_forward_hook(after, with_kwargs=True)]
    try:
        twin(x, timestep=t, class_labels=y)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return (got["out"] - got["in"]).float()


@dataclass
class Row:
    method: str
    knob: str
    full: float
    conservative: float
    aggressive: float
    psnr: float
    flop_ratio: float
    flop_speedup: float = 0.0       # 1 / flop_ratio (the plot's x: right is less compute)


def rows_of(setup: Setup) -> list[tuple[str, str, object]]:
    one = [0.04, 0.08, 0.12, 0.16, 0.24]
    return [
        *[("1 threshold: full / aggressive", f"{t}", (t, t)) for t in one],
        *[("1 threshold: full / conservative", f"{t} r={setup.ratio}", (0.0, t)) for t in (0.08, 0.16, 0.24)],
        *[("2 thresholds: full / conservative / aggressive", f"{lo}/{hi} r={setup.ratio}", (lo, hi))
          for lo, hi in ((0.04, 0.12), (0.08, 0.16), (0.08, 0.24), (0.12, 0.24), (0.16, 0.32))],
        *[("fixed schedule: DuCa v2", f"N={n} r={setup.ratio}", dataclasses.replace(
            presets("dit-xl-2", "duca"), interval=n, ratio=setup.ratio, ratio_schedule=None)) for n in (3, 4)],
        *[("fixed schedule: FORA", f"N={n}", FORAConfig(interval=n)) for n in (2, 3)],
    ]


@torch.no_grad()
def run(setup: Setup, model, progress=lambda it, **kw: it, rows=None) -> list[Row]:
    """``rows``: (method, knob, thresholds or config) to run instead of ``rows_of(setup)``."""
    noise, labels = starts(setup.batch)
    reference = sample(lambda x, t, y: model(x, timestep=t, class_labels=y).sample, noise, labels, setup.steps,
                       setup.guidance)
    twin = copy.deepcopy(model)
    out_rows = []
    for method, knob, what in progress(rows if rows is not None else rows_of(setup), desc="two thresholds"):
        torch._dynamo.reset()
        decider = Decider(*what) if isinstance(what, tuple) else None
        config = OnlineConfig(modes=("full", "subset", "reuse"), ratio=setup.ratio, compute_first=1,
                              decider=decider) if decider else what
        fast = torch.compile(copy.deepcopy(model), backend=duca_compile.duca_backend(config, inner="eager"),
                             fullgraph=True, dynamic=False)

        def denoise(x, t, y):
            if decider is not None:
                decider.decide(head_residual(twin, x, t, y))
            return fast(x, timestep=t, class_labels=y).sample

        with request_starter(fast, setup.steps) as before:
            before()
            out = sample(denoise, noise, labels, setup.steps, setup.guidance)
        s = duca_compile.stats(fast)
        steps = s["steps"]
        counts = decider.counts if decider else {"full": steps["full"], "subset": steps["subset"],
                                                 "reuse": steps["reuse"] + steps["skip"] + steps["partial"]}
        if decider is not None:
            # block 0 computes on every step: an aggressive step is PARTIAL in duca's stats
            seen = {"full": steps["full"], "subset": steps["subset"], "reuse": steps["reuse"] + steps["partial"]}
            assert counts == seen, (counts, steps)
        out_rows.append(Row(method, knob, counts["full"], counts["subset"], counts["reuse"], psnr(out, reference),
                            s["flop_ratio"], 1 / s["flop_ratio"]))
    return out_rows
