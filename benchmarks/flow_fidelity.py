"""``python -m benchmarks flow-fidelity [--quick]``: duca's FLUX presets on the trained flow-matching
model (``benchmarks.flow``): PSNR against the uncached samples, caption faithfulness and FLOP ratio, at
20 and 50 steps. Quality only: every row runs through the eager inner compiler, one request per
caption set, no wall-clock and no peers (issue 31's fronts add both).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import duca_compile
from duca_compile import AdaptiveConfig, FORAConfig, presets

from .flow import PATCH, FlowModel, sample_flow
from .metrics import psnr
from .shapes import COLOURS, POSITIONS, SHAPES, SIDE, faithfulness, tokens

__all__ = ["Setup", "QUICK", "STANDARD", "Row", "rows_of", "run"]


@dataclass(frozen=True)
class Setup:
    steps: tuple          # request lengths
    guidance: float
    per_caption: int      # samples per caption (48 captions)


QUICK = Setup(steps=(8,), guidance=3.0, per_caption=1)
STANDARD = Setup(steps=(20, 50), guidance=3.0, per_caption=2)


@dataclass
class Row:
    steps: int
    method: str
    knob: str
    psnr: float
    faithful: float       # all three attributes right
    shape: float          # the attribute that fails first
    flop_ratio: float
    flop_speedup: float = 0.0
    notes: str = ""


def rows_of() -> list[tuple[str, str, object]]:
    return [
        ("FORA", "N=3", FORAConfig(interval=3)),
        ("ToCa", "preset flux-dev", presets("flux-dev", "toca")),
        ("DuCa", "preset flux-dev", presets("flux-dev", "duca")),
        ("TaylorSeer", "preset flux-dev", presets("flux-dev", "taylorseer")),
        ("HiCache", "preset flux-dev", presets("flux-dev", "hicache")),
        # the captions have 3 text tokens: ClusCa clusters each stream, so K is at most 3 there
        ("ClusCa", "preset flux-dev, K=3", dataclasses.replace(presets("flux-dev", "clusca"), clusters=3)),
        ("adaptive", "fbcache", presets("any", "fbcache")),
        ("adaptive", "dbcache-f1b0", presets("any", "dbcache-f1b0")),
        ("adaptive + TaylorSeer", "F1B0 0.12 W=3", AdaptiveConfig(threshold=0.12, warmup=3, forecast="taylorseer")),
        ("adaptive + Hermite", "F1B0 0.12 W=3", AdaptiveConfig(threshold=0.12, warmup=3, forecast="hermite")),
    ]


def _inputs(per_caption: int, seed: int = 1):
    captions = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS] * per_caption
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), (SIDE // PATCH) ** 2, 3 * PATCH * PATCH, generator=g)
    return captions, noise, torch.tensor([tokens(*c) for c in captions])


@torch.no_grad()
def run(setup: Setup, model: FlowModel, progress=lambda it, **kw: it, rows=None) -> list[Row]:
    """``rows``: (method, knob, config) to run instead of ``rows_of()``."""
    captions, noise, toks = _inputs(setup.per_caption)
    out = []
    for steps in setup.steps:
        reference = sample_flow(model, noise, toks, steps, setup.guidance)
        f = faithfulness(reference, captions)
        out.append(Row(steps, "uncached", "-", float("inf"), f["all"], f["shape"], 1.0, 1.0))
        for method, knob, config in progress(rows if rows is not None else rows_of(), desc=f"{steps} steps"):
            torch._dynamo.reset()
            fast = torch.compile(model.transformer, backend=duca_compile.duca_backend(config, inner="eager"),
                                 fullgraph=True, dynamic=False)
            with duca_compile.sampling(fast, num_steps=steps):
                images = sample_flow(model, noise, toks, steps, setup.guidance, transformer=fast)
            s = duca_compile.stats(fast)
            f = faithfulness(images, captions)
            notes = "" if s["cache_hits"] else "no cache hit"
            out.append(Row(steps, method, knob, psnr(images, reference), f["all"], f["shape"], s["flop_ratio"],
                           1 / s["flop_ratio"], notes))
    return out
