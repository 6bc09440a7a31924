"""What the GPU check's sections share: the sizes they run, building a model and its inputs, one
sampling request, compiling regionally, and timing and memory readings on CPU or CUDA."""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

import duca_compile
from duca_compile.models import MODELS, make_inputs, make_model, model_inputs, randomize_zero_params

from .sampling import request_starter
from .speed import _peak_mb, _request, _reset_peak

__all__ = ["Size", "SPEED_SIZES", "TINY_SPEED_SIZES", "build", "call_inputs", "request", "compile_regional",
           "timed_requests", "release", "counters_delta", "duca_backend_for"]

# float inputs cast to the model's dtype (ids, timesteps and masks stay as they are)
CAST = ("hidden_states", "encoder_hidden_states", "pooled_projections")
REPEATED = {"DiTTransformer2DModel": ["BasicTransformerBlock"], "PixArtTransformer2DModel": ["BasicTransformerBlock"]}


@dataclass(frozen=True)
class Size:
    """One model size a section times: a full-size registry config with ``overrides`` (fewer
    blocks), or with ``family`` a tiny ``duca_compile.models`` family (``benchmarks`` DiT when "dit")."""

    name: str
    registry: str                  # the presets' model
    batch: int
    steps: int
    overrides: dict = field(default_factory=dict)
    family: str | None = None
    blocks_of: int | str | None = None   # the full model's block count, when ``overrides`` cut it

    def blocks(self, model) -> str:
        c = model.config
        n = f"{c.num_layers}" + (f" + {c.num_single_layers} single" if "num_single_layers" in c else "")
        full = f" of {self.blocks_of}" if self.blocks_of else ""
        return n + full


# FLUX at 1024²: 4096 image tokens, 512 text tokens, batch 1, 28 steps. 5 + 10 of its 19 + 38 blocks
# keep the section inside its share of an 8-minute run (per-block cost is what is measured; the
# FLOP ratio and the speed-up per block do not depend on how many there are).
SPEED_SIZES = [
    Size("DiT-XL/2 256²", "dit-xl-2", batch=2, steps=50),
    Size("FLUX.1-dev 1024²", "flux-dev", batch=1, steps=28, overrides=dict(num_layers=5, num_single_layers=10),
         blocks_of="19 + 38 single"),
]
TINY_SPEED_SIZES = [
    Size("tiny DiT", "dit-xl-2", batch=2, steps=6, family="dit"),
    Size("tiny Flux", "flux-dev", batch=1, steps=6, family="flux"),
]


def build(size: Size, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights (seed 0), zero-initialised gates made random so every block shows in the output.
    Full-size models are built in ``dtype`` directly: FLUX in fp32 first would need twice the memory."""
    torch.manual_seed(0)
    if size.family == "dit":
        from .models import make_dit

        model = make_dit(num_layers=2, num_attention_heads=2, attention_head_dim=32)    # speed.py's "tiny"
    elif size.family is not None:
        model = make_model(size.family)
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = MODELS[size.registry].build(**size.overrides)
        finally:
            torch.set_default_dtype(previous)
    randomize_zero_params(model)
    return model.to(device, dtype).eval()


def to_model(kw: dict, model: torch.nn.Module) -> dict:
    """Inputs moved to the model's device, the latent / text / pooled ones in its dtype."""
    p = next(model.parameters())

    def move(k, v):
        if isinstance(v, dict):
            return {kk: move(kk, vv) for kk, vv in v.items()}
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(p.device, p.dtype if k in CAST and v.is_floating_point() else None)

    return {k: move(k, v) for k, v in kw.items()}


def call_inputs(model, size: Size, timestep: float = 999.0) -> dict:
    """Keyword inputs of one call (``return_dict=False``), for ``precompile`` and the flow loop."""
    if size.family is not None and size.family != "dit":
        return to_model(make_inputs(size.family, model, batch=size.batch, timestep=timestep), model)
    if type(model).__name__ == "DiTTransformer2DModel":
        c = model.config
        g = torch.Generator().manual_seed(0)
        # integer timesteps, as DDIM's: a float one would be another dtype for the blocks' adaLN
        # inputs, which Dynamo compiles apart (regionally compiled blocks take the timestep)
        kw = dict(hidden_states=torch.randn(size.batch, c.in_channels, c.sample_size, c.sample_size, generator=g),
                  timestep=torch.full((size.batch,), int(timestep), dtype=torch.long),
                  class_labels=torch.arange(size.batch) % 10,
                  return_dict=False)
        return to_model(kw, model)
    return to_model(model_inputs(model, size.batch), model)


def request(fn, model, size: Size, device: str) -> None:
    """One sampling request of ``size.steps`` calls: DDIM over DiT (``speed._request``), an Euler
    loop over the family's inputs otherwise (the transformer calls are what is timed)."""
    if type(model).__name__ == "DiTTransformer2DModel":
        return _request(fn, model, size.batch, size.steps, device)
    kw = call_inputs(model, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(kw["hidden_states"].shape, generator=g).to(kw["hidden_states"])
    flux = "img_ids" in kw
    for i in range(size.steps):
        t = 1.0 - i / size.steps
        kw.update(hidden_states=x, timestep=torch.full_like(kw["timestep"], t if flux else 1000 * t))
        out = fn(**kw)[0]
        x = x - out[:, :x.shape[1]].to(x.dtype) / size.steps
    if device == "cuda":
        torch.cuda.synchronize()


def compile_regional(model, backend) -> torch.nn.Module:
    """``compile_repeated_blocks`` with ``backend`` (diffusers declares no repeated blocks for DiT)."""
    if not getattr(model, "_repeated_blocks", None):
        model._repeated_blocks = REPEATED[type(model).__name__]
    model.compile_repeated_blocks(backend=backend, fullgraph=True, dynamic=False)
    return model


def duca_backend_for(config, inner: str, **kw):
    return duca_compile.duca_backend(config, inner=inner, **kw)


def _clock(device: str):
    """Seconds of ``fn()``: CUDA events on CUDA (the stream's time, synchronised at the end), else wall."""
    def timed(fn) -> float:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return timed


def timed_requests(fn, model, size: Size, device: str, repeats: int, duca: bool, before=None) -> dict:
    """A warm-up request, then ``repeats`` timed ones: seconds (warm-up, median), peak memory in MB
    during the timed ones (CUDA: allocated; CPU: the process's resident set). ``before()`` runs ahead
    of each request (default: a new duca ``sampling()`` request when ``duca``)."""
    clock = _clock(device)
    starter = request_starter(fn, size.steps) if duca else contextlib.nullcontext(before or (lambda: None))
    times = []
    with torch.no_grad(), starter as before:
        for i in range(repeats + 1):
            before()
            if i == 1:
                _reset_peak(device)
            times.append(clock(lambda: request(fn, model, size, device)))
    return {"warm_s": times[0], "seconds": statistics.median(times[1:]), "peak_mb": _peak_mb(device)}


def release(device: str) -> None:
    """Drop compiled code and freed memory between rows (each row builds its model anew)."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def counters_delta(before: dict | None = None) -> dict:
    """Inductor's FX-graph cache hits and misses (since ``before``): how cold a row's compile was."""
    try:
        from torch._dynamo.utils import counters

        now = {k: counters["inductor"].get(k, 0) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
    except Exception:  # noqa: BLE001 - private counters: unknown rather than a crash
        return {}
    return {k: v - (before or {}).get(k, 0) for k, v in now.items()}
