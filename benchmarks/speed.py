"""``python -m benchmarks speed [--quick] [--device cuda]``: per model size, one sampling request with
eager, plain ``torch.compile``, duca with FULL every step (the cost of being there) and each preset.

Per row: request wall-clock (median of ``repeats`` after a warm-up request), its ratio to plain
``torch.compile``, the FLOP ratio and how much of its speed-up the wall-clock realises, compile time
(the warm-up request minus a timed one; per variant for duca), variants, cache memory. The CPU
sizes run here; the GPU sizes (full DiT-XL/2, PixArt-α 1024², FLUX.1-dev 1024²) need ``--device
cuda`` and a GPU.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass

import torch

import duca_compile
from duca_compile import ScriptedConfig, presets

__all__ = ["SIZES", "Row", "run"]

# name -> (DiT config overrides on benchmarks.models.DIT_CONFIG, trained weights?, batch, device)
SIZES = {
    "tiny": (dict(num_layers=2, num_attention_heads=2, attention_head_dim=32), False, 2, "cpu"),
    "digits (trained)": ({}, True, 2, "cpu"),
    "DiT-B-like": (dict(num_layers=12, num_attention_heads=12, attention_head_dim=64), False, 2, "cpu"),
    "DiT-XL/2": (dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                      out_channels=8, num_embeds_ada_norm=1000), False, 2, "cuda"),
}
METHODS = ("fora", "toca", "duca", "duca-v1", "taylorseer", "clusca")


@dataclass
class Row:
    size: str
    method: str
    seconds: float
    vs_compile: float          # plain torch.compile seconds / these
    flop_ratio: float | None
    realised: float | None     # (wall-clock speed-up) / (FLOP speed-up)
    compile_seconds: float
    variants: int | None
    compile_per_variant: float | None
    cache_mb: float | None


def _model(size: str, device: str):
    from .models import load_dit, make_dit

    overrides, trained, _, _ = SIZES[size]
    torch.manual_seed(0)
    model = load_dit() if trained else make_dit(**overrides)
    if not trained:
        from duca_compile.tiny import randomize_zero_params

        randomize_zero_params(model)
    return model.eval().to(device)


def _request(fn, model, batch: int, steps: int, device: str):
    from .sampling import sample

    c = model.config
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g).to(device)
    labels = (torch.arange(batch) % min(10, c.num_embeds_ada_norm)).to(device)
    # a learned-sigma model (DiT-XL/2: 8 output channels) predicts epsilon in its first channels
    denoise = lambda x, t, y: fn(x, timestep=t, class_labels=y).sample[:, :c.in_channels]      # noqa: E731
    sample(denoise, noise, labels, steps, guidance=1.0)
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, model, batch, steps, device, repeats, before=lambda: None) -> tuple[float, float]:
    times = []
    for _ in range(repeats + 1):
        before()
        start = time.perf_counter()
        _request(fn, model, batch, steps, device)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def run(sizes, steps: int, repeats: int, methods=METHODS, inner: str = "inductor", progress=lambda it, **kw: it):
    rows = []
    for size in progress(list(sizes), desc="sizes"):
        _, _, batch, device = SIZES[size]
        model = _model(size, device)
        with torch.no_grad():
            warm, eager = _timed(model, model, batch, steps, device, repeats)
            rows.append(Row(size, "eager", eager, 0.0, None, None, 0.0, None, None, None))
            torch._dynamo.reset()
            plain = torch.compile(model, fullgraph=True, dynamic=False) if inner == "inductor" else model
            warm, base = _timed(plain, model, batch, steps, device, repeats)
            rows[-1].vs_compile = base / eager
            rows.append(Row(size, "torch.compile" if inner == "inductor" else "eager (quick)", base, 1.0, None,
                            None, max(warm - base, 0.0), None, None, None))
            configs = [("duca FULL only", ScriptedConfig(modes=("full",)))]
            configs += [(m, presets("dit-xl-2", m)) for m in methods]
            for name, config in progress(configs, desc=size):
                rows.append(_duca_row(size, name, config, model, batch, steps, device, repeats, inner, base))
    return rows


def _duca_row(size, name, config, model, batch, steps, device, repeats, inner, base) -> Row:
    torch._dynamo.reset()
    fast = torch.compile(model, backend=duca_compile.duca_backend(config, inner=inner), fullgraph=True,
                         dynamic=False)
    contexts = []

    def before():
        while contexts:
            contexts.pop().__exit__(None, None, None)
        contexts.append(duca_compile.sampling(fast, num_steps=steps))
        contexts[-1].__enter__()

    try:
        warm, med = _timed(fast, model, batch, steps, device, repeats, before)
    finally:
        while contexts:
            contexts.pop().__exit__(None, None, None)
    s = duca_compile.stats(fast)
    speedup = base / med
    return Row(size, name, med, speedup, s["flop_ratio"], speedup * s["flop_ratio"], max(warm - med, 0.0),
               s["variants_compiled"], s["compile_seconds"] / max(s["variants_compiled"], 1), s["cache_bytes"] / 2**20)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
