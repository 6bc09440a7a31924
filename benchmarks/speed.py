"""``python -m benchmarks speed [--quick] [--device cuda]``: per model size, one sampling request with
eager, plain ``torch.compile``, duca with FULL every step (the cost of being there) and each preset.

Per row: request wall-clock (median of ``repeats`` after a warm-up request; the timed requests
run round robin over the rows), its ratio to plain
``torch.compile``, the FLOP ratio and how much of its speed-up the wall-clock realises, compile time
(the warm-up request minus a timed one; per variant for duca, from a cold Inductor cache per row),
variants, peak memory during the timed requests (the process's: every row of a size is alive) and
cache memory. The CPU sizes run here; the GPU
sizes (full DiT-XL/2; PixArt-α and FLUX.1-dev at 1024², random weights in bf16, their presets) need
``--device cuda`` and a GPU.
"""
from __future__ import annotations

import contextlib
import re
import statistics
import time
from dataclasses import dataclass, field

import torch

import duca_compile
from duca_compile import ScriptedConfig, presets

from .sampling import sample

__all__ = ["SIZES", "METHODS", "Size", "Row", "run"]

METHODS = ("fora", "toca", "duca", "duca-v1", "taylorseer", "clusca")


@dataclass(frozen=True)
class Size:
    overrides: dict            # on benchmarks.models.DIT_CONFIG, or on the registry model's config
    trained: bool = False
    batch: int = 2
    device: str = "cpu"
    steps: int | None = None   # None: the command's --steps (50)
    methods: tuple | None = None  # None: every preset of the model (a big model on 2 CPU cores: a few)
    registry: str = "dit-xl-2"  # the presets' model; with ``full`` a duca_compile.models.full_size model
    full: bool = False         # built from duca_compile.models.full_size.MODELS (random weights) instead


SIZES = {
    "tiny": Size(dict(num_layers=2, num_attention_heads=2, attention_head_dim=32)),
    "digits (trained)": Size({}, trained=True),
    "DiT-B-like": Size(dict(num_layers=12, num_attention_heads=12, attention_head_dim=64), steps=20,
                       methods=("fora", "duca", "taylorseer")),
    "DiT-XL/2": Size({}, device="cuda", full=True),
    # one image with classifier-free guidance (batch 2), the pipelines' default step counts
    "PixArt-α 1024²": Size({}, device="cuda", steps=20, registry="pixart-alpha", full=True),
    "FLUX.1-dev 1024²": Size({}, batch=1, device="cuda", steps=28, registry="flux-dev", full=True),
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
    from duca_compile.models import randomize_zero_params

    from .models import load_dit, make_dit

    spec = SIZES[size]
    torch.manual_seed(0)
    if spec.trained:
        return load_dit().eval().to(device)
    if spec.full:
        from duca_compile.models import MODELS

        with torch.device(device):
            model = MODELS[spec.registry].build(**spec.overrides)
        if device == "cuda":
            model = model.to(torch.bfloat16)
    else:
        model = make_dit(**spec.overrides)
    randomize_zero_params(model)                 # zero-initialised gates would make every block a no-op
    return model.eval().to(device)


def _request(fn, model, batch: int, steps: int, device: str):
    """One sampling request: DDIM with class labels for DiT; for the other families an Euler loop
    over the family's inputs (``models.model_inputs``): the transformer calls are what is timed."""
    c = model.config
    if type(model).__name__ != "DiTTransformer2DModel":
        from duca_compile.models import model_inputs

        kw, dtype = model_inputs(model, batch), next(model.parameters()).dtype
        for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):     # bf16 on CUDA
            if k in kw:
                kw[k] = kw[k].to(dtype)
        x = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(0)).to(kw["hidden_states"])
        flux = "img_ids" in kw
        for i in range(steps):
            t = 1.0 - i / steps
            kw.update(hidden_states=x, timestep=torch.full_like(kw["timestep"], t if flux else 1000 * t))
            out = fn(**kw)[0]
            x = x - out[:, :x.shape[1]] / steps
        if device == "cuda":
            torch.cuda.synchronize()
        return
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g).to(
        device, next(model.parameters()).dtype)
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


def _time_request(fn, model, batch, steps, device) -> tuple[float, float]:
    """(seconds, peak MB) of one request."""
    _reset_peak(device)
    start = time.perf_counter()
    _request(fn, model, batch, steps, device)
    return time.perf_counter() - start, _peak_mb(device)


def _cold(inner: str):
    """Every compiled row starts from an empty Inductor cache (disk and memory): compile times are
    what a first run pays, not what an earlier row left behind."""
    if inner != "inductor":
        return contextlib.nullcontext()
    from torch._inductor.utils import fresh_cache

    return fresh_cache()


@dataclass
class _Candidate:
    name: str
    fn: object                 # what the sampler calls
    config: object = None      # duca's config; None: eager or plain torch.compile
    warm_s: float = 0.0
    times: list = field(default_factory=list)    # the timed requests' seconds
    peak_mb: float = 0.0

    def request(self, model, batch, steps, device) -> tuple[float, float]:
        scope = (duca_compile.sampling(self.fn, num_steps=steps) if self.config is not None
                 else contextlib.nullcontext())
        with scope:
            return _time_request(self.fn, model, batch, steps, device)


def run(sizes, steps: int, repeats: int, methods=METHODS, inner: str = "inductor", progress=lambda it, **kw: it):
    """Per size: every row's warm-up request (its compile, from a cold cache), then the timed
    requests round robin over the rows, so drift in the machine's speed hits every row alike."""
    rows = []
    limit = torch._dynamo.config.recompile_limit
    for size in progress(list(sizes), desc="sizes"):
        spec = SIZES[size]
        n, device = spec.steps or steps, spec.device
        model = _model(size, device)
        torch._dynamo.reset()
        # one Dynamo entry per compiled row on the same forward: keep them all (the default limit is 8)
        torch._dynamo.config.recompile_limit = 64
        baseline = (_Candidate("torch.compile", torch.compile(model, fullgraph=True, dynamic=False))
                    if inner == "inductor" else _Candidate("eager (quick)", model))
        candidates = [_Candidate("eager", model), baseline]
        configs = [("duca FULL only", ScriptedConfig(modes=("full",)))]
        available = presets()[spec.registry]
        configs += [(m, presets(spec.registry, m)) for m in methods
                    if m in available and (spec.methods is None or m in spec.methods)]
        candidates += [_Candidate(name, torch.compile(model, backend=duca_compile.duca_backend(config, inner=inner),
                                                      fullgraph=True, dynamic=False), config)
                       for name, config in configs]
        try:
            with torch.no_grad():
                for c in progress(candidates, desc=f"{size} warm-up"):
                    with _cold(inner) if c.fn is not model else contextlib.nullcontext():
                        c.warm_s, _ = c.request(model, spec.batch, n, device)
                for _ in progress(range(repeats), desc=f"{size} timed"):
                    for c in candidates:
                        seconds, peak = c.request(model, spec.batch, n, device)
                        c.times.append(seconds)
                        c.peak_mb = max(c.peak_mb, peak)
        finally:
            torch._dynamo.config.recompile_limit = limit
        rows += _rows(size, n, candidates)
    return rows


def _rows(size, steps, candidates) -> list:
    """``candidates``: eager, the baseline (plain torch.compile), then duca's rows."""
    med = {c.name: statistics.median(c.times) for c in candidates}
    base = med[candidates[1].name]
    out = []
    for c in candidates:
        compile_s = max(c.warm_s - med[c.name], 0.0) if c.fn is not candidates[0].fn else 0.0
        if c.config is None:
            out.append(Row(size, c.name, steps, med[c.name], base / med[c.name], None, None, compile_s, None,
                           None, c.peak_mb, None))
            continue
        s = duca_compile.stats(c.fn)
        if c.name != "duca FULL only" and s["cache_hits"] == 0:
            raise RuntimeError(f"duca {c.name}: no cache hit: the method never engaged")
        speedup = base / med[c.name]
        out.append(Row(size, c.name, steps, med[c.name], speedup, s["flop_ratio"], speedup * s["flop_ratio"],
                       compile_s, s["variants_compiled"], s["compile_seconds"] / max(s["variants_compiled"], 1),
                       c.peak_mb, s["cache_bytes"] / 2**20))
    return out


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
