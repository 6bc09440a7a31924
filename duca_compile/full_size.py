"""FLOPs of full-size architectures (DiT-XL/2, PixArt-α, FLUX.1-dev) without their weights.

The model is built on the ``meta`` device and traced once by Dynamo; each config then gets a fresh
duca backend on that graph and every step's variant is counted (``flops.variant_flops``). Nothing
runs, so a 12B-parameter FLUX fits a laptop:

    duca_compile.flops_report("dit-xl-2", FORAConfig(interval=3), num_steps=50, batch=2)
    python -m duca_compile.full_size                      # the README table, model x method
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from .flops import full_key, runner_flops, variant_flops
from .policies import CacheConfig, ClusCaConfig, DuCaConfig, FORAConfig, Mode, TaylorSeerConfig, ToCaConfig

__all__ = ["flops_report", "flops_table", "meta_model", "model_inputs", "MODELS", "STEPS", "default_configs", "preset_configs"]

@dataclass(frozen=True)
class ModelSpec:
    """A diffusers transformer config at full size, and the inputs of one call at ``batch``."""

    cls: str
    kwargs: dict
    inputs: object          # (model, batch) -> keyword inputs, on the model's device
    about: str = ""

    def build(self, **overrides) -> torch.nn.Module:
        import diffusers

        return getattr(diffusers, self.cls)(**{**self.kwargs, **overrides}).eval()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dit_inputs(model, batch):
    c, d = model.config, _device(model)
    s = c.sample_size
    return dict(hidden_states=torch.zeros(batch, c.in_channels, s, s, device=d),
                timestep=torch.zeros(batch, device=d),
                class_labels=torch.zeros(batch, dtype=torch.long, device=d), return_dict=False)


def _pixart_inputs(model, batch, text_len=120):
    c, d = model.config, _device(model)
    s = c.sample_size
    cond = {"resolution": None, "aspect_ratio": None}
    if model.use_additional_conditions:
        cond = {"resolution": torch.zeros(batch, 2, device=d), "aspect_ratio": torch.zeros(batch, 1, device=d)}
    return dict(hidden_states=torch.zeros(batch, c.in_channels, s, s, device=d),
                timestep=torch.zeros(batch, device=d),
                encoder_hidden_states=torch.zeros(batch, text_len, c.caption_channels, device=d),
                added_cond_kwargs=cond, return_dict=False)


def _flux_inputs(model, batch, image_tokens=4096, text_len=512):
    c, d = model.config, _device(model)
    kw = dict(hidden_states=torch.zeros(batch, image_tokens, c.in_channels, device=d),
              encoder_hidden_states=torch.zeros(batch, text_len, c.joint_attention_dim, device=d),
              pooled_projections=torch.zeros(batch, c.pooled_projection_dim, device=d),
              timestep=torch.zeros(batch, device=d), img_ids=torch.zeros(image_tokens, 3, device=d),
              txt_ids=torch.zeros(text_len, 3, device=d), return_dict=False)
    if c.guidance_embeds:
        kw["guidance"] = torch.zeros(batch, device=d)
    return kw


MODELS: dict[str, ModelSpec] = {
    "dit-xl-2": ModelSpec("DiTTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero"),
        _dit_inputs, "DiT-XL/2, 256x256 (32x32 latent, 256 tokens), class-conditional"),
    "pixart-alpha": ModelSpec("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
        use_additional_conditions=True), _pixart_inputs,
        "PixArt-alpha XL/2, 1024x1024 (4096 tokens), 120 T5 tokens"),
    "flux-dev": ModelSpec("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), _flux_inputs,
        "FLUX.1-dev, 1024x1024 (4096 image tokens), 512 T5 tokens"),
}

_FAMILY_INPUTS = {"DiTTransformer2DModel": _dit_inputs, "PixArtTransformer2DModel": _pixart_inputs,
                  "FluxTransformer2DModel": _flux_inputs}


def meta_model(name: str, **overrides) -> torch.nn.Module:
    """A registry model built on the ``meta`` device: full-size shapes, no weights."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)} or an nn.Module, got {name!r}")
    with torch.device("meta"):
        return MODELS[name].build(**overrides)


def model_inputs(model: torch.nn.Module, batch: int = 2) -> dict:
    """Keyword inputs of one call of a DiT / PixArt / Flux transformer, on its device."""
    fn = _FAMILY_INPUTS.get(type(model).__name__)
    if fn is None:
        raise ValueError(f"no input recipe for {type(model).__name__}: pass inputs=dict(...) to flops_report")
    return fn(model, batch)


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
        captured.append((gm, list(example_inputs), torch._guards.detect_fake_mode(example_inputs)))
        return gm.forward

    start = time.perf_counter()
    limits = {k: 1 << 16 for k in ("recompile_limit", "accumulated_recompile_limit")
              if hasattr(torch._dynamo.config, k)}
    with torch.no_grad(), torch._dynamo.config.patch(**limits):
        torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(**inputs)
    if len(captured) != 1:
        raise RuntimeError(f"duca flops: expected one graph, Dynamo made {len(captured)}")
    gm, example_inputs, fake_mode = captured[0]
    return _Trace(gm, example_inputs, fake_mode, model, time.perf_counter() - start)


def _runner(trace: _Trace, config: CacheConfig):
    from .backend import DuCaBackend

    # The report's runner is never called, so it creates no caching state: a model compiled with
    # duca too keeps its own untouched.
    ctx = torch._guards.TracingContext(trace.fake_mode) if trace.fake_mode is not None else None
    with torch.no_grad(), (torch._guards.tracing(ctx) if ctx is not None else contextlib.nullcontext()):
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
        model = getattr(model, "_orig_mod", model)          # a torch.compile'd module: trace the original
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
    acc = runner_flops(runner, calls)
    full_step = variant_flops(runner, full_key(runner))
    ratio = acc["flops_run"] / acc["flops_full"]
    return {
        "model": name, "config": config, "num_steps": num_steps, "batch": batch,
        "flops_full_step": full_step, "flops_full": acc["flops_full"], "flops_run": acc["flops_run"],
        "flop_ratio": ratio, "speedup_flops": 1.0 / ratio if ratio else float("inf"),
        "steps": {m.value: modes.get(m.value, 0) for m in Mode},
        "flops_per_mode": {m: sum(v) / len(v) for m, v in per_mode.items()},
        "flops_per_variant": _per_variant(runner, calls),
        "flops_clustering": acc["flops_clustering"], "tokens_per_site": acc["tokens_per_site"],
        "trace_seconds": trace.seconds, "count_seconds": time.perf_counter() - start,
    }


# -- tables -------------------------------------------------------------------------------------

# Steps each model's presets were tuned for (duca_compile.policies.presets.MODELS).
STEPS = {"dit-xl-2": 50, "pixart-alpha": 20, "flux-dev": 50}


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
    p = argparse.ArgumentParser(prog="python -m duca_compile.full_size",
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
