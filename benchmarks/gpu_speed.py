"""Speed at full size: plain regional ``torch.compile`` against duca (FULL only, FORA, DuCa, TaylorSeer).

Regional compilation (each repeated block compiled; embeddings and head eager) for every row: one
block graph per class compiles in seconds where the whole 28-block graph takes a minute per
variant, and plain ``compile_repeated_blocks`` is then the fair baseline for duca's regional mode.
"""
from __future__ import annotations

import time

import duca_compile
from duca_compile import ScriptedConfig, presets

from .gpu_models import (SPEED_SIZES, TINY_SPEED_SIZES, build, call_inputs, compile_regional, counters_delta,
                         duca_backend_for, release, timed_requests)

TITLE = "Speed"
METHODS = ("duca FULL only", "fora", "duca", "taylorseer")
COLUMNS = {"size": ("size", "{}"), "blocks": ("blocks", "{}"), "method": ("method", "{}"), "steps": ("steps", "{}"),
           "request s": ("seconds", "{:.3f}"), "speed-up": ("speedup", "{:.2f}x"),
           "FLOP ratio": ("flop_ratio", "{:.1%}"), "wall-clock / FLOP speed-up": ("realised", "{:.0%}"),
           "compile s": ("compile_s", "{:.1f}"), "compile how": ("compile_how", "{}"),
           "variants": ("variants", "{}"), "FX cache hit/miss": ("fx_cache", "{}"),
           "peak MB": ("peak_mb", "{:.0f}"), "cache MB": ("cache_mb", "{:.1f}"),
           "cache hits": ("cache_hits", "{}"), "host syncs": ("host_syncs", "{}"), "note": ("note", "{}")}
ABOUT = """Random weights (bf16 on CUDA, fp32 at the toy sizes of `--tiny`: 2-block DiT and Flux, 6
steps). One request: DiT DDIM with class labels, batch 2; FLUX an Euler loop over its inputs (4096
image + 512 text tokens at full size), batch 1. Request
s: median of the timed requests after a warm-up request (CUDA events on CUDA, wall clock on CPU).
Speed-up: plain regional compile's request s over the row's. FLOP ratio: duca's compiled variants'
FLOPs x calls over the uncached model's (`stats()["flop_ratio"]`, fake-tensor counts); wall-clock /
FLOP speed-up = speed-up x FLOP ratio (100 %: the wall clock gains all the FLOPs saved). Compile s:
`duca_compile.precompile` seconds where the library has it ("precompile"), else the warm-up request
minus a timed one ("warm-up - timed"). FX cache hit/miss: Inductor's FX-graph cache during the row
(rows share the cache: a later row may reuse an identical block graph). Peak MB: CUDA peak allocated
(CPU: the process's peak resident set) during the timed requests; cache MB: duca's feature caches;
host syncs: device-to-host timestep reads duca made (`stats()["host_syncs"]`; 0 expected inside
`sampling()`). Every caching row must show cache hits."""


def run(ctx, section) -> None:
    sizes = TINY_SPEED_SIZES if ctx.tiny else SPEED_SIZES
    repeats = 1 if ctx.tiny else 3
    section.note(f"{repeats} timed request(s) per row after one warm-up request; the toy sizes are 2-block "
                 "models at a few steps (mechanics, not speed)" if ctx.tiny else
                 f"{repeats} timed requests per row after one warm-up request")
    for size in sizes:
        base = None
        for method in ("plain",) + METHODS:
            if ctx.out_of_time():
                section.skip_for_time(f"{size.name} {method}")
                continue
            config, note = _config(size, method)
            if method != "plain" and config is None:
                section.rows.append(_row(size, method, None, note=note))
                continue
            with section.attempt(f"{size.name} {method}"):
                row = measure(ctx, size, method, config, base, repeats)
                if method == "plain":
                    base, row["speedup"] = row["seconds"], 1.0
                if method not in ("plain", "duca FULL only"):
                    section.check(f"{size.name} {method}: cache hits", (row["cache_hits"] or 0) > 0,
                                  f"{row['cache_hits']} hits")
                section.rows.append(row)
            ctx.save()


def _config(size, method):
    if method == "plain":
        return None, ""
    if method == "duca FULL only":
        return ScriptedConfig(modes=("full",)), ""
    if method in presets()[size.registry]:
        return presets(size.registry, method), f"preset {size.registry}:{method}"
    return None, f"no {method} preset for {size.registry}"


def _row(size, method, model, **kw) -> dict:
    row = {"size": size.name, "blocks": size.blocks(model) if model is not None else "–", "method": method,
           "steps": size.steps, "seconds": None, "speedup": None, "flop_ratio": None, "realised": None,
           "flop_speedup": None, "compile_s": None, "compile_how": "", "variants": None, "fx_cache": "",
           "peak_mb": None, "cache_mb": None, "cache_hits": None, "host_syncs": None, "note": ""}
    row.update(kw)
    return row


def measure(ctx, size, method, config, base, repeats) -> dict:
    """One row: build the model anew, compile its blocks, (precompile,) warm up, time."""
    release(ctx.device)
    model = build(size, ctx.device, ctx.dtype)
    duca = config is not None
    plain_backend = "inductor" if ctx.inner == "inductor" else ctx.inner
    compile_regional(model, duca_backend_for(config, ctx.inner) if duca else plain_backend)
    before, notes, pre = counters_delta(), [], None
    if duca and hasattr(duca_compile, "precompile"):
        import torch

        with torch.no_grad():
            pre = duca_compile.precompile(model, **call_inputs(model, size), num_steps=size.steps)
    elif duca:
        notes.append("duca_compile.precompile missing: compile s from the warm-up")
    timing = timed_requests(model, model, size, ctx.device, repeats, duca)
    row = _row(size, method, model, seconds=timing["seconds"], peak_mb=timing["peak_mb"])
    fx = counters_delta(before)
    row["fx_cache"] = f"{fx['fxgraph_cache_hit']}/{fx['fxgraph_cache_miss']}" if fx else "unknown"
    if pre is not None:
        row["compile_s"], row["compile_how"] = pre["seconds"], "precompile"
    else:
        row["compile_s"], row["compile_how"] = max(timing["warm_s"] - timing["seconds"], 0.0), "warm-up - timed"
    if base:
        row["speedup"] = base / timing["seconds"]
    if duca:
        _duca_stats(model, row, notes)
        if pre is not None and row["variants"] is not None and row["variants"] > pre["variants"]:
            notes.append(f"{row['variants'] - pre['variants']} variant(s) compiled after precompile "
                         "(in the warm-up request)")
    row["note"] = "; ".join(notes)
    model = None
    release(ctx.device)
    return row


def _duca_stats(model, row, notes) -> None:
    s = duca_compile.stats(model, flops=False)
    row["cache_hits"], row["variants"] = s["cache_hits"], s["variants_compiled"]
    row["host_syncs"] = s.get("host_syncs")
    row["cache_mb"] = s["cache_bytes"] / 2**20
    try:
        start = time.perf_counter()
        row["flop_ratio"] = duca_compile.stats(model)["flop_ratio"]
        row["flop_speedup"] = 1 / row["flop_ratio"]
        if row["speedup"]:
            row["realised"] = row["speedup"] * row["flop_ratio"]
        if time.perf_counter() - start > 5:
            notes.append(f"FLOP count took {time.perf_counter() - start:.0f} s")
    except Exception as e:  # noqa: BLE001 - a number that could not be measured stays unknown
        notes.append(f"FLOP ratio unknown: {type(e).__name__}: {str(e)[:120]}")
