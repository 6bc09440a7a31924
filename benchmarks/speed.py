"""``python -m benchmarks speed [--quick] [--device cuda]``: per model size, one sampling request with
eager, plain ``torch.compile``, duca with FULL every step (the cost of being there) and each preset.

Per row: request wall-clock (median of ``repeats`` after a warm-up request), its ratio to plain
``torch.compile``, the FLOP ratio and how much of its speed-up the wall-clock realises, compile time
(the warm-up request minus a timed one; per variant for duca, from a cold Inductor cache per row),
variants, peak memory during the timed requests and cache memory. The CPU sizes run here; the GPU
sizes (full DiT-XL/2) need ``--device cuda`` and a GPU.
"""
from __future__ import annotations

import contextlib
import re
import statistics
import time
from dataclasses import dataclass

import torch

import duca_compile
from duca_compile import ScriptedConfig, presets

__all__ = ["SIZES", "METHODS", "Size", "Row", "run"]

METHODS = ("fora", "toca", "duca", "duca-v1", "taylorseer", "clusca")


@dataclass(frozen=True)
class Size:
    overrides: dict            # on benchmarks.models.DIT_CONFIG
    trained: bool = False
    batch: int = 2
    device: str = "cpu"
    steps: int | None = None   # None: the command's --steps (50)
    methods: tuple | None = None  # None: every preset (a big model on 2 CPU cores: a few)


SIZES = {
    "tiny": Size(dict(num_layers=2, num_attention_heads=2, attention_head_dim=32)),
    "digits (trained)": Size({}, trained=True),
    "DiT-B-like": Size(dict(num_layers=12, num_attention_heads=12, attention_head_dim=64), steps=20,
                       methods=("fora", "duca", "taylorseer")),
    "DiT-XL/2": Size(dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                          out_channels=8, num_embeds_ada_norm=1000), device="cuda"),
}


@dataclass
class Row:
    size: str
    method: str
    steps: int
    seconds: float
    vs_compile: float          # plain torch.compile seconds / these
    flop_ratio: float | None
    realised: float | None     # (wall-clock speed-up) / (FLOP speed-up)
    compile_seconds: float
    variants: int | None
    compile_per_variant: float | None
    peak_mb: float             # CUDA: peak allocated; CPU: peak resident set of the process
    cache_mb: float | None


def _model(size: str, device: str):
    from .models import load_dit, make_dit

    spec = SIZES[size]
    torch.manual_seed(0)
    model = load_dit() if spec.trained else make_dit(**spec.overrides)
    if not spec.trained:
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


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:     # Linux: resets VmHWM to the current RSS
            f.write("5")
    except OSError:
        pass                                              # elsewhere: the process's peak so far


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    except OSError:
        return peak_rss_mb()


def _timed(fn, model, batch, steps, device, repeats, before=lambda: None) -> tuple[float, float, float]:
    """(warm-up seconds, median seconds of the timed requests, peak MB during them)."""
    times = []
    for i in range(repeats + 1):
        before()
        if i == 1:
            _reset_peak(device)
        start = time.perf_counter()
        _request(fn, model, batch, steps, device)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:]), _peak_mb(device)


def _cold(inner: str):
    """Every compiled row starts from an empty Inductor cache (disk and memory): compile times are
    what a first run pays, not what an earlier row left behind."""
    if inner != "inductor":
        return contextlib.nullcontext()
    from torch._inductor.utils import fresh_cache

    return fresh_cache()


def run(sizes, steps: int, repeats: int, methods=METHODS, inner: str = "inductor", progress=lambda it, **kw: it):
    rows = []
    for size in progress(list(sizes), desc="sizes"):
        spec = SIZES[size]
        n, device = spec.steps or steps, spec.device
        model = _model(size, device)
        with torch.no_grad():
            warm, eager, peak = _timed(model, model, spec.batch, n, device, repeats)
            rows.append(Row(size, "eager", n, eager, 0.0, None, None, 0.0, None, None, peak, None))
            torch._dynamo.reset()
            with _cold(inner):
                plain = torch.compile(model, fullgraph=True, dynamic=False) if inner == "inductor" else model
                warm, base, peak = _timed(plain, model, spec.batch, n, device, repeats)
            rows[-1].vs_compile = base / eager
            rows.append(Row(size, "torch.compile" if inner == "inductor" else "eager (quick)", n, base, 1.0, None,
                            None, max(warm - base, 0.0), None, None, peak, None))
            configs = [("duca FULL only", ScriptedConfig(modes=("full",)))]
            configs += [(m, presets("dit-xl-2", m)) for m in methods if spec.methods is None or m in spec.methods]
            for name, config in progress(configs, desc=size):
                with _cold(inner):
                    rows.append(_duca_row(size, name, config, model, spec.batch, n, device, repeats, inner, base))
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
        warm, med, peak = _timed(fast, model, batch, steps, device, repeats, before)
    finally:
        while contexts:
            contexts.pop().__exit__(None, None, None)
    s = duca_compile.stats(fast)
    if name != "duca FULL only" and s["cache_hits"] == 0:
        raise RuntimeError(f"duca {name}: no cache hit: the method never engaged")
    speedup = base / med
    return Row(size, name, steps, med, speedup, s["flop_ratio"], speedup * s["flop_ratio"], max(warm - med, 0.0),
               s["variants_compiled"], s["compile_seconds"] / max(s["variants_compiled"], 1), peak,
               s["cache_bytes"] / 2**20)


def plot(rows: list, path) -> None:
    """Per size: wall-clock speed-up over plain torch.compile next to the FLOP speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r.size for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rs = [r for r in rows if r.size == size and r.flop_ratio is not None]
        x = range(len(rs))
        ax.bar([i - 0.2 for i in x], [r.vs_compile for r in rs], width=0.4, label="wall-clock")
        ax.bar([i + 0.2 for i in x], [1 / r.flop_ratio for r in rs], width=0.4, label="FLOPs")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(x), [r.method.replace("duca FULL only", "FULL only") for r in rs], rotation=40,
                      ha="right", fontsize=7)
        ax.set_title(f"{size}, {rs[0].steps} steps" if rs else size, fontsize=9)
        ax.set_ylabel("speed-up vs torch.compile", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
