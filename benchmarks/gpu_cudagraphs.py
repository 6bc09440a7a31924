"""CUDA graphs: duca compiled with ``mode="reduce-overhead"`` against the same model without graphs.

A scripted FULL / REUSE / SKIP cycle (three variants) over two requests: CUDA-graph trees warm each
variant up on its first call and record it on the next, then replay. Checked: recordings (one per
variant expected; counted in Inductor's CUDA-graph tree manager, a private structure, so "unknown"
where it is absent), the timed request's outputs against the run without graphs, and each mode's
call latency with and without graphs (what graphs save is launch overhead, largest on the cheap
REUSE / SKIP calls).
"""
from __future__ import annotations

import statistics
import time

import torch

import duca_compile
from duca_compile import ScriptedConfig
from duca_compile.runtime import state_of

from .gpu_correctness import TOLERANCE
from .gpu_models import Size, build, duca_backend_for, release, request
from .sampling import request_starter

TITLE = "CUDA graphs (reduce-overhead)"
CONFIG = ScriptedConfig(modes=("full", "reuse", "skip"))
# DiT-XL/2's width, tokens and batch; 4 of its 28 blocks so two whole-model compiles (with and
# without graphs, three variants each) fit the section's share of the run
SIZE = Size("DiT-XL/2 256²", "dit-xl-2", batch=2, steps=12, overrides=dict(num_layers=4), blocks_of=28)
TINY = Size("tiny DiT", "dit-xl-2", batch=2, steps=6, family="dit")
COLUMNS = {"size": ("size", "{}"), "blocks": ("blocks", "{}"), "mode": ("mode", "{}"), "calls": ("calls", "{}"),
           "ms / call, no graphs": ("ms_plain", "{:.2f}"), "ms / call, graphs": ("ms_graphs", "{:.2f}"),
           "graphs / no graphs": ("ratio", "{:.2f}")}
ABOUT = """Whole-model `torch.compile(model, backend=duca_backend(ScriptedConfig(modes=("full",
"reuse", "skip")), mode="reduce-overhead"), fullgraph=True)` against the same compile without
`mode`: on CUDA DiT-XL/2's geometry (4 of its blocks, random bf16 weights, batch 2, 12 DDIM steps
per request, two requests); with `--tiny` the tiny DiT, 6 steps. Per-call latency: each call of the second request between two `torch.cuda.synchronize()`
(one call alone, host and device), median per mode. Outputs of the second requests compared per
call: max |graphs - no graphs| / max |no graphs|."""


def run(ctx, section) -> None:
    size = TINY if ctx.tiny else SIZE
    graphs = ctx.device == "cuda" and ctx.inner == "inductor"
    if not graphs:
        section.note(f"CUDA graphs do not apply here ({ctx.device}, inner {ctx.inner}): both runs compile without "
                     "them, so no recordings are expected; the section checks its own mechanics only")
    plain = _run(ctx, size, None)
    if ctx.out_of_time():
        section.skip_for_time("the reduce-overhead run")
        return
    graphed = _run(ctx, size, "reduce-overhead" if graphs else None)
    model_blocks = plain["blocks"]
    for mode in ("full", "reuse", "skip"):
        a, b = plain["ms"].get(mode, []), graphed["ms"].get(mode, [])
        if a and b:
            ma, mb = statistics.median(a), statistics.median(b)
            section.rows.append({"size": size.name, "blocks": model_blocks, "mode": mode, "calls": len(b),
                                 "ms_plain": ma, "ms_graphs": mb, "ratio": mb / ma})
    diff, bitwise = _compare(plain["outputs"], graphed["outputs"])
    tol = TOLERANCE[ctx.dtype]
    section.check("outputs with graphs equal those without", diff <= tol,
                  f"max diff / max|out| {diff:.2e} (tolerance {tol:.0e}); bitwise equal: {bitwise}")
    rec, how = graphed["recordings"]
    variants = graphed["variants"]
    section.note(f"CUDA-graph recordings: {rec if rec is not None else 'unknown'} ({how}); variants compiled: "
                 f"{variants}; CUDA-graph skips counted by Inductor: {graphed['skips']}")
    if graphs:
        section.check("one CUDA-graph recording per variant", rec is not None and rec == variants,
                      f"{rec} recordings ({how}), {variants} variants, {graphed['skips']} skips")
        section.check("Inductor skipped no CUDA graph", graphed["skips"] == 0,
                      f"{graphed['skips']} skips (TORCH_LOGS=cudagraphs says why)")
    else:
        section.check("no recordings without CUDA graphs", not rec, f"{rec} recordings ({how})")
    section.check("the timed requests ran REUSE and SKIP calls", {"reuse", "skip"} <= set(graphed["ms"]),
                  f"modes {sorted(graphed['ms'])}")
    ctx.save()


def _run(ctx, size, mode) -> dict:
    release(ctx.device)
    skips_before = _skips()
    model = build(size, ctx.device, ctx.dtype)
    fast = torch.compile(model, backend=duca_backend_for(CONFIG, ctx.inner, **({"mode": mode} if mode else {})),
                         fullgraph=True, dynamic=False)
    ms, outputs = {}, []
    timing = {"on": False}

    def call(*args, **kw):
        _sync(ctx.device)
        start = time.perf_counter()
        out = fast(*args, **kw)
        _sync(ctx.device)
        if timing["on"]:
            ms.setdefault(state_of(fast).last_plan.mode.value, []).append(1000 * (time.perf_counter() - start))
            sample = out.sample if hasattr(out, "sample") else out[0]
            outputs.append(sample.detach().float().clone())      # a graph's output is overwritten by its next replay
        return out

    with torch.no_grad(), request_starter(fast, size.steps) as before:
        for timed in (False, True):
            before()
            timing["on"] = timed
            request(call, model, size, ctx.device)
    result = {"ms": ms, "outputs": outputs, "recordings": _recordings(ctx.device), "skips": _skips() - skips_before,
              "variants": duca_compile.stats(fast, flops=False)["variants_compiled"], "blocks": size.blocks(model)}
    fast = model = None      # dropped before release(): the closure above holds them too
    release(ctx.device)
    return result


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _compare(a: list, b: list) -> tuple[float, bool]:
    if len(a) != len(b) or not a:
        return float("inf"), False
    worst = max(float((x - y).abs().max()) / (float(x.abs().max()) or 1.0) for x, y in zip(a, b))
    return worst, all(torch.equal(x, y) for x, y in zip(a, b))


def _recordings(device: str) -> tuple[int | None, str]:
    """CUDA graphs recorded so far on the current device: the nodes of Inductor's CUDA-graph trees."""
    if device != "cuda":
        return 0, "no CUDA device"
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        if manager is None:
            return 0, "no CUDA-graph tree manager: nothing was graphed"
        count, stack = 0, [n for nodes in manager.roots.values() for n in nodes]
        while stack:
            node = stack.pop()
            count += 1
            stack += [c for nodes in node.children.values() for c in nodes]
        return count, f"tree nodes; {len(manager.ids_to_funcs)} functions under CUDA-graph trees"
    except Exception as e:  # noqa: BLE001 - private API: unknown rather than a crash
        return None, f"unknown: {type(e).__name__}: {str(e)[:100]}"


def _skips() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"].get("cudagraph_skips", 0))
    except Exception:  # noqa: BLE001
        return 0
