"""Correctness: each compiled cached model against duca's eager oracle, call by call, in fp32 and bf16.

The oracle (``duca_compile.reference.ReferenceCache``) runs the uncompiled model with the same
actions, token indices and cache slots as the compiled call it replays, with caches of its own; a
difference beyond the dtype's rounding means the compiled variant computes something else.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

import duca_compile
from duca_compile import RatioSchedule, ScriptedConfig, ToCaConfig, presets
from duca_compile.models import make_inputs, make_model
from duca_compile.reference import ReferenceCache
from duca_compile.runtime import state_of

from .gpu_models import compile_regional, duca_backend_for, to_model

# max |compiled - oracle| / max |oracle| per call. fp32: Inductor reorders reductions and fuses
# pointwise chains (~1e-6 seen); 1e-4 leaves room and still catches any wrong cache (O(1) errors).
# bf16: Inductor keeps fused chains in fp32 and rounds once, eager rounds after every op: a few
# bf16 ulps (2^-8 = 0.4 % each) per op over 2 blocks; 5e-2 is ~13 ulps at the output's largest value.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
SCRIPT = ("full", "reuse", "skip", "subset", "subset")        # F R A C C F R over 7 steps
# a ratio that changes per step and layer: every SUBSET step and site gets its own k
K_SCHEDULE = ToCaConfig(interval=2, ratio=0.4, ratio_schedule=RatioSchedule(
    step_weight=0.9, layer_weight=0.6, module_weight=1.0, module_tau=0.6))
# (case, family, config, steps, regional)
# (case, family, config, steps, regional); every kind of case first, then the other families: a run
# out of its time share still covered each kind
SCRIPTED = ScriptedConfig(modes=SCRIPT, ratio=0.5)
CASES = [
    ("FULL/REUSE/SKIP/SUBSET (dit)", "dit", SCRIPTED, 7, False),
    ("SUBSET, one symbolic-k compile, k per step (pixart)", "pixart", K_SCHEDULE, 8, False),
    ("TaylorSeer preset dit-xl-2 (dit)", "dit", presets("dit-xl-2", "taylorseer"), 10, False),
    ("ClusCa preset flux-dev, 4 clusters (flux)", "flux", dataclasses.replace(presets("flux-dev", "clusca"),
                                                                          clusters=4), 10, False),
    ("regional DuCa (dit, compile_repeated_blocks)", "dit", duca_compile.DuCaConfig(), 7, True),
    *[(f"FULL/REUSE/SKIP/SUBSET ({f})", f, SCRIPTED, 7, False) for f in ("pixart", "flux")],
]
DTYPES = (torch.float32, torch.bfloat16)
LETTERS = {"full": "F", "reuse": "R", "skip": "A", "subset": "C", "partial": "P"}     # as duca's explain()

TITLE = "Correctness against the eager oracle"
COLUMNS = {"case": ("case", "{}"), "dtype": ("dtype", "{}"), "modes run": ("modes", "{}"),
           "worst diff / max|out|": ("worst", "{:.2e}"), "tolerance": ("tolerance", "{:.0e}"),
           "cache hits": ("cache_hits", "{}"), "variants": ("variants", "{}"), "ok": ("ok", "{}")}
ABOUT = f"""Tiny random-weight DiT, PixArt and Flux models (`duca_compile.models`), compiled with duca
through the inner compiler named above (Inductor emits Triton on CUDA), each call compared with
`ReferenceCache.from_compiled(model, fast).replay(fast, **inputs)` on the same inputs. Worst diff:
max |compiled - oracle| / max |oracle| over the calls. Tolerances: fp32 {TOLERANCE[torch.float32]:.0e}
(Inductor's reordered reductions, ~1e-6 typical), bf16 {TOLERANCE[torch.bfloat16]:.0e} (eager rounds
each op to bf16, Inductor each fused chain once: several bf16 ulps of 2^-8). A wrong cache is off
by O(1). Caching cases must show cache hits; the symbolic-k case must run two or more k through
one SUBSET compile."""


def run(ctx, section) -> None:
    # On a CPU the inner compiler is exact in both dtypes (aot_eager): bf16 runs where it changes what
    # duca builds (the cache dtypes of the scripted cases) and fp32 everywhere, to fit minutes on 2 cores.
    cpu = ctx.device == "cpu"
    if cpu:
        section.note("CPU: bf16 on the scripted FULL/REUSE/SKIP/SUBSET cases only, fp32 on every case")
    section.note("modes run: F full, R reuse (or forecast), A skip (aggressive), C subset (conservative), "
                 "P partial")
    for name, family, config, steps, regional in CASES:
        for dtype in DTYPES:
            if cpu and dtype is torch.bfloat16 and not isinstance(config, ScriptedConfig):
                continue
            if ctx.out_of_time():
                section.skip_for_time(f"{name} {_dt(dtype)}")
                continue
            with section.attempt(f"{name} {_dt(dtype)}"):
                section.rows.append(_case(ctx, section, name, family, config, steps, regional, dtype))
            ctx.save()


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _case(ctx, section, name, family, config, steps, regional, dtype) -> dict:
    torch._dynamo.reset()
    model = make_model(family).to(ctx.device, dtype)
    backend = duca_backend_for(config, ctx.inner)
    if regional:
        twin, fast = copy.deepcopy(model), compile_regional(model, backend)
    else:
        twin, fast = model, torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    worst, modes, oracle = {}, [], None
    with torch.no_grad(), duca_compile.sampling(fast, num_steps=steps):
        for i in range(steps):
            kw = to_model(make_inputs(family, model, timestep=900.0 - 800.0 * i / max(steps - 1, 1), seed=i), twin)
            out = fast(**kw)[0].float()
            oracle = oracle or ReferenceCache.from_compiled(twin, fast)
            ref = oracle.replay(fast, **kw)[0].float()
            mode = state_of(fast).last_plan.mode.value
            modes.append(mode)
            scale = float(ref.abs().max()) or 1.0
            worst[mode] = max(worst.get(mode, 0.0), float((out - ref).abs().max()) / scale)
    s = duca_compile.stats(fast, flops=False)
    label = f"{name} {_dt(dtype)}"
    tol = TOLERANCE[dtype]
    ok = section.check(f"{label}: within {tol:.0e} of the oracle", max(worst.values()) <= tol,
                       f"worst per mode {_fmt(worst)}")
    ok &= section.check(f"{label}: cache hits", s["cache_hits"] > 0, f"{s['cache_hits']} hits, modes {modes}")
    if config is K_SCHEDULE:
        ok &= _one_compile_many_k(section, label, fast)
    if isinstance(config, ScriptedConfig):
        ok &= section.check(f"{label}: every scripted mode ran", set(SCRIPT) <= set(modes), f"modes {modes}")
    return {"case": name, "dtype": _dt(dtype), "modes": "".join(LETTERS.get(m, "?") for m in modes),
            "worst": max(worst.values()), "per_mode": worst, "tolerance": tol, "cache_hits": s["cache_hits"],
            "variants": s["variants_compiled"], "ok": bool(ok)}


def _one_compile_many_k(section, label, fast) -> bool:
    """The SUBSET calls ran several k, all through one compiled SUBSET pattern."""
    runner, piece = state_of(fast).graphs()[0]
    sized = [k for k, n in piece.variant_calls.items() if n and runner.pattern(k) != k]
    ks = sorted({a for key in sized for _, a in key[1] if isinstance(a, int)})
    patterns = {runner.pattern(k) for k in sized}
    subset_compiles = [p for p in patterns if p in runner.variants]
    return section.check(f"{label}: one SUBSET compile serves every k", len(ks) >= 2 and len(patterns) == 1
                         and len(subset_compiles) == 1 and runner.compiles == 2,
                         f"k run {ks}; SUBSET patterns {len(patterns)}; compiles {runner.compiles} "
                         "(FULL + one SUBSET expected)")


def _fmt(worst: dict) -> str:
    return ", ".join(f"{m} {v:.1e}" for m, v in worst.items())
