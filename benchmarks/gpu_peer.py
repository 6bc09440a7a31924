"""Peer: cache-dit's DBCache on the same DiT, forced to compute exactly the steps duca FORA computes.

FORA (the DiT-XL/2 preset, N=3) computes every block on steps 0, 3, 6, ... and reuses cached
attention / MLP outputs in between. cache-dit is given ``steps_computation_mask`` = that schedule
(1 = compute, 0 = cache) with ``steps_computation_policy="static"``, which makes every 0-step a cache
step without its residual-diff test, and F1B0 (block 0 always runs, no tail blocks). Both are
compiled the same way: each transformer block with ``torch.compile`` (``compile_repeated_blocks``),
Inductor's defaults (cache-dit's ``set_compile_configs`` would turn coordinate-descent tuning on for
it alone, so it is not applied).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from duca_compile import Mode, presets
from duca_compile.policies import make_policy

from .gpu import Skip
from .gpu_models import (SPEED_SIZES, TINY_SPEED_SIZES, build, compile_regional, counters_delta, release, request,
                         timed_requests)
from .gpu_speed import COLUMNS, _row, measure

TITLE = "Peer: cache-dit DBCache at FORA's computed steps"
COLUMNS = COLUMNS
ABOUT = __doc__.split("\n\n", 1)[1].replace("\n", " ") + (
    " Columns as in the speed section; the cache-dit FLOP ratio is counted with `FlopCounterMode` over "
    "one eager request with the cache against one without (duca's: `stats()['flop_ratio']`).")


def run(ctx, section) -> None:
    if importlib.util.find_spec("cache_dit") is None:
        raise Skip("cache_dit is not importable here (pip install cache-dit; on the GPU machine "
                   "benchmarks/gpu_wheels.sh brings its wheel)")
    size = (TINY_SPEED_SIZES if ctx.tiny else SPEED_SIZES)[0]
    repeats = 1 if ctx.tiny else 3
    fora = presets(size.registry, "fora")
    policy = make_policy(fora)
    mask = [int(i == 0 or policy.plan(i, size.steps).mode is Mode.FULL) for i in range(size.steps)]
    section.note(f"forced cache-dit mask ({sum(mask)} of {size.steps} steps computed): {''.join(map(str, mask))}")
    plain = measure(ctx, size, "plain", None, None, repeats)
    plain["speedup"] = 1.0
    section.rows.append(plain)
    ctx.save()
    duca = measure(ctx, size, "fora", fora, plain["seconds"], repeats)
    section.rows.append(duca)
    section.check("duca FORA: cache hits", (duca["cache_hits"] or 0) > 0, f"{duca['cache_hits']} hits")
    ctx.save()
    if ctx.out_of_time():
        section.skip_for_time("the cache-dit row")
        return
    row, cached = _cache_dit(ctx, size, mask, plain["seconds"], repeats)
    section.rows.append(row)
    expected = [i for i, m in enumerate(mask) if not m]
    section.check("cache-dit cached exactly FORA's non-computed steps", cached == expected,
                  f"cache-dit cached steps {cached}; expected {expected}")
    section.check("cache-dit: cache hits", bool(cached), f"{len(cached)} cached steps in the last request")


def _cache_dit(ctx, size, mask, base, repeats):
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import cache_dit
    from torch.utils.flop_counter import FlopCounterMode

    from .peers import CacheDiT

    release(ctx.device)
    model = build(size, ctx.device, ctx.dtype)
    config = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.08, max_warmup_steps=1,
                  steps_computation_mask=list(mask), steps_computation_policy="static")
    peer = CacheDiT("cache-dit DBCache F1B0, FORA's step mask", "cache-dit", config, config=config)
    with torch.no_grad():
        with FlopCounterMode(display=False) as uncached:
            request(model, model, size, ctx.device)
        peer.apply(model, size.steps)
        peer.new_request(model, size.steps)
        with FlopCounterMode(display=False) as cached_flops:
            request(model, model, size, ctx.device)
    compile_regional(model, "inductor" if ctx.inner == "inductor" else ctx.inner)
    before = counters_delta()
    timing = timed_requests(model, model, size, ctx.device, repeats, duca=False,
                            before=lambda: peer.new_request(model, size.steps))
    fx = counters_delta(before)
    stats = cache_dit.summary(model, logging=False)
    cached = sorted(next((s.cached_steps for s in stats if s.cached_steps), []))
    ratio = cached_flops.get_total_flops() / uncached.get_total_flops()
    speedup = base / timing["seconds"]
    row = _row(size, "cache-dit DBCache F1B0 (FORA's mask)", model, seconds=timing["seconds"], speedup=speedup,
               flop_ratio=ratio, flop_speedup=1 / ratio, realised=speedup * ratio,
               compile_s=max(timing["warm_s"] - timing["seconds"], 0.0), compile_how="warm-up - timed",
               peak_mb=timing["peak_mb"], cache_hits=len(cached),
               fx_cache=f"{fx['fxgraph_cache_hit']}/{fx['fxgraph_cache_miss']}" if fx else "unknown",
               note=f"cache_dit {getattr(cache_dit, '__version__', '?')}; cache hits = cached steps per request")
    peer.remove(model)
    model = None
    release(ctx.device)
    return row, cached
