"""FLOPs of full-size architectures (DiT-XL/2, PixArt-α, FLUX.1-dev) without their weights.

The model is built on the ``meta`` device and traced once by Dynamo; each config then gets a fresh
duca backend on that graph and every step's variant is counted (``flops.variant_flops``). Nothing
runs, so a 12B-parameter FLUX fits a laptop:

    duca_compile.flops_report("dit-xl-2", FORAConfig(interval=3), num_steps=50, batch=2)
    python -m duca_compile.full_size_flops                     # the table in docs/flops.md, model x method
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import _torch
from .flops import full_key, runner_flops, variant_flops
from .models.full_size import MODELS, STEPS, meta_model, model_inputs
from .policies import AdaptiveConfig, CacheConfig, ClusCaConfig, DuCaConfig, FORAConfig, Mode, TaylorSeerConfig, ToCaConfig

__all__ = ["flops_report", "flops_table", "meta_model", "model_inputs", "MODELS", "STEPS", "default_configs", "preset_configs"]

# One trace per (model, inputs) is enough for every config: Dynamo's graph and example inputs are
# kept and handed to a fresh duca backend per config, exactly as torch.compile would hand them.
_TRACES: dict = {}


@dataclass
class _Trace:
    gm: fx.GraphModule
    example_inputs: list
    fake_mode: object
    model: torch.nn.Module
    seconds: float


def _trace(model: torch.nn.Module, inputs: dict) -> _Trace:
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, list(example_inputs), _torch.detect_fake_mode(example_inputs)))
        return gm.forward

    start = time.perf_counter()
    with torch.no_grad(), _torch.unlimited_recompiles():
        torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(**inputs)
    if len(captured) != 1:
        raise RuntimeError(f"duca flops: expected one graph, Dynamo made {len(captured)}")
    gm, example_inputs, fake_mode = captured[0]
    return _Trace(gm, example_inputs, fake_mode, model, time.perf_counter() - start)


def _runner(trace: _Trace, config: CacheConfig):
    from .backend import DuCaBackend

    # The report's runner is never called, so it creates no caching state: a model compiled with
    # duca too keeps its own untouched.
    if isinstance(config, AdaptiveConfig):
        raise ValueError("flops_report counts a fixed schedule before any request; AdaptiveConfig decides each "
                         "step from the data: read stats(model)['flop_ratio'] after a request instead")
    ctx = _torch.TracingContext(trace.fake_mode) if trace.fake_mode is not None else None
    with torch.no_grad(), (_torch.tracing(ctx) if ctx is not None else contextlib.nullcontext()):
        runner = DuCaBackend(config, inner="eager")(trace.gm, trace.example_inputs)
    if not hasattr(runner, "plan_step"):
        raise RuntimeError("duca flops: the duca backend found no cache sites in this model")
    return runner


def _per_variant(runner, calls) -> dict:
    """Variant label ("FULL", "SUBSET(k=8,12)", ...) -> FLOPs of one call; "#2"... on equal labels."""
    from .report import _variant_name

    out = {}
    for key in calls:
        label, i = _variant_name(key), 1
        while label in out:
            i += 1
            label = f"{_variant_name(key)}#{i}"
        out[label] = variant_flops(runner, key)
    return out


def flops_report(model, config: CacheConfig, num_steps: int = 50, batch: int = 2, inputs: dict | None = None,
                 **model_overrides) -> dict:
    """FLOPs of one request of ``num_steps`` denoising steps under ``config``, against the uncached model.

    model: a name in ``MODELS`` ("dit-xl-2", "pixart-alpha", "flux-dev"), built on the ``meta``
        device (``model_overrides`` change its config, e.g. ``num_layers=2``), or an ``nn.Module``
        (put it on ``meta`` to count without weights; it is traced with one plain call).
    inputs: keyword inputs of one call (default: the family's recipe at ``batch``, e.g. both
        classifier-free-guidance branches in one batch of 2).

    Step 0 is FULL; step i follows ``policy.plan(i, num_steps)``, as one request runs. Returns
    ``flops_full`` (num_steps x one FULL step), ``flops_run``, ``flop_ratio``, ``speedup_flops``,
    ``steps`` (steps per mode), ``flops_per_mode`` (one step of each mode seen; the mean when a
    mode has several variants, e.g. per-step ratios), ``flops_per_variant``, ``tokens_per_site``
    (tokens computed over the request), ``flops_clustering`` (ClusCa's k-means, apart) and the
    trace and counting times in seconds.
    """
    if not isinstance(config, CacheConfig):
        raise ValueError(f"config must be a CacheConfig such as FORAConfig(...), got {type(config).__name__}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if isinstance(model, str):
        name = model
        cache_key = (name, batch, tuple(sorted(model_overrides.items())))
        trace = _TRACES.get(cache_key) if inputs is None else None
        if trace is None:
            module = meta_model(name, **model_overrides)
            trace = _trace(module, inputs or model_inputs(module, batch))
            _TRACES.clear()                     # keep one traced model alive at a time
            if inputs is None:
                _TRACES[cache_key] = trace
    elif isinstance(model, torch.nn.Module):
        if model_overrides:
            raise ValueError(f"model config overrides {sorted(model_overrides)} need a model name")
        model = _torch.original_module(model)               # a torch.compile'd module: trace the original
        name = type(model).__name__
        trace = _trace(model, inputs or model_inputs(model, batch))
    else:
        raise ValueError(f"model must be one of {sorted(MODELS)} or an nn.Module, got {model!r}")

    start = time.perf_counter()
    runner = _runner(trace, config)
    calls: Counter = Counter()
    modes: Counter = Counter()
    per_mode: dict = {}
    for step in range(num_steps):
        if step == 0:                                   # a request always starts with a FULL step
            actions, skip, mode = {s.name: "compute" for s in runner.sitemap.sites}, False, Mode.FULL
        else:
            plan, actions, skip = runner.plan_step(step, num_steps)
            mode = plan.mode
        key = runner.key(actions, skip)
        calls[key] += 1
        modes[mode.value] += 1
        per_mode.setdefault(mode.value, []).append(variant_flops(runner, key))
    acc = runner_flops(runner, calls, cold_clusterings=1 if calls[full_key(runner)] else 0)   # one request
    full_step = variant_flops(runner, full_key(runner))
    ratio = acc["flops_run"] / acc["flops_full"]
    return {
        "model": name, "config": config, "num_steps": num_steps, "batch": batch,
        "flops_full_step": full_step, "flops_full": acc["flops_full"], "flops_run": acc["flops_run"],
        "flop_ratio": ratio, "speedup_flops": 1.0 / ratio if ratio else float("inf"),
        "steps": {m.value: modes.get(m.value, 0) for m in Mode},
        "flops_per_mode": {m: sum(v) / len(v) for m, v in per_mode.items()},
        "flops_per_variant": _per_variant(runner, calls),
        "fallbacks": dict(Counter(fb.reason for fb in runner.fallbacks)),
        "flops_clustering": acc["flops_clustering"], "tokens_per_site": acc["tokens_per_site"],
        "trace_seconds": trace.seconds, "count_seconds": time.perf_counter() - start,
    }


def default_configs() -> dict[str, CacheConfig]:
    """One config per method, used where ``duca_compile.presets`` has none for a model."""
    return {"fora": FORAConfig(interval=3), "toca": ToCaConfig(interval=3, ratio=0.07),
            "duca": DuCaConfig(interval=3, ratio=0.05), "taylorseer": TaylorSeerConfig(interval=4, max_order=4),
            "clusca": ClusCaConfig(interval=5, clusters=16)}


def preset_configs(model: str) -> dict[str, CacheConfig]:
    """Method -> config: every ``duca_compile.presets(model, method)`` for ``model`` where the
    presets exist and know it, else ``default_configs()``."""
    try:
        from .policies.presets import presets
        methods = presets().get(model)
    except ImportError:
        methods = None
    if not methods:
        return default_configs()
    return {m: presets(model, m) for m in methods}


def flops_table(models=tuple(MODELS), configs: dict | None = None, num_steps: int | None = None, batch: int = 2,
                reports: list | None = None) -> str:
    """A markdown table, one row per model: steps, one FULL step's TFLOPs, then per method the FLOP
    speed-up over the uncached model with the FLOP ratio ("-": no config for that pair).

    configs: method -> config for every model (default: ``preset_configs(model)``). num_steps:
    steps per request (default: ``STEPS[model]``, what the presets were tuned for). ``reports``,
    if a list, receives every ``flops_report`` (with a "method" key)."""
    per_model = {name: configs if configs is not None else preset_configs(name) for name in models}
    methods = list(dict.fromkeys(m for cfgs in per_model.values() for m in cfgs))
    rows = []
    for name, cfgs in per_model.items():
        steps = num_steps or STEPS.get(name, 50)
        cells, full = [], None
        for method in methods:
            if method not in cfgs:
                cells.append("-")
                continue
            r = flops_report(name, cfgs[method], num_steps=steps, batch=batch)
            full = r["flops_full_step"]
            cells.append(f"{r['speedup_flops']:.2f}x ({r['flop_ratio']:.1%})")
            if reports is not None:
                reports.append({**r, "method": method})
        full_cell = f"{full / 1e12:.3f}" if full is not None else "-"
        rows.append(f"| {name} | {steps} | {full_cell} | " + " | ".join(cells) + " |")
    head = f"| model | steps | FULL step TFLOPs (batch {batch}) | " + " | ".join(methods) + " |"
    sep = "|" + "---|" * (3 + len(methods))
    return "\n".join([head, sep, *rows])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m duca_compile.full_size_flops",
                                description="FLOPs per method on full-size models (meta device, no weights)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=None, help="steps per request (default: per model, %s)" % STEPS)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)
    reports: list = []
    table = flops_table(args.models, num_steps=args.steps, batch=args.batch, reports=reports)
    print(f"FLOP speed-up over the uncached model (FLOP ratio), one request; batch {args.batch}.\n")
    print(table)
    print()
    for r in reports:
        extra = f", k-means {r['flops_clustering'] / 1e12:.3f} TFLOPs" if r["flops_clustering"] else ""
        print(f"{r['model']:13s} {r['method']:11s} {r['config']!r}: steps {r['steps']}{extra}")


if __name__ == "__main__":
    main()
