"""``python -m benchmarks train|fidelity|speed|flops|subset_k|dispatch|compile|adaptive|adaptive-cond|two-thresholds|flow-fidelity|flow-front|dit-front|plot [--quick] [--device cuda]``,
``python -m benchmarks gpu --out DIR [--device cuda|cpu] [--tiny] [--sections a,b]``

Results land in ``benchmarks/results/`` as markdown (with the device and versions), JSON and PNG;
``--quick`` runs a few-minute version of each on the CPU (its files get a ``_quick`` suffix).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import pathlib
import warnings

import torch

import duca_compile

from .fidelity import FIDELITY_PRESETS
from .results_io import RESULTS, environment, get, markdown_table, plot_bars, plot_tradeoff, sample_grid, write

FIDELITY_COLUMNS = {"method": ("method", "{}"), "knob": ("knob", "{}"), "PSNR (dB)": ("psnr", "{:.2f}"),
                    "SSIM": ("ssim", "{:.4f}"), "class acc.": ("accuracy", "{:.1%}"), "FD to real": ("fd", "{:.2f}"),
                    "FLOP ratio": ("flop_ratio", "{:.1%}"), "request s": ("seconds", "{:.1f}"),
                    "speed-up vs compile": ("speedup", "{:.2f}x"),
                    "compile s": ("compile_seconds", "{:.1f}"), "notes": ("notes", "{}")}
SPEED_COLUMNS = {"size": ("size", "{}"), "method": ("method", "{}"), "steps": ("steps", "{}"),
                 "request s": ("seconds", "{:.3f}"),
                 "vs torch.compile": ("vs_compile", "{:.2f}x"), "FLOP ratio": ("flop_ratio", "{:.1%}"),
                 "wall-clock / FLOP speed-up": ("realised", "{:.0%}"), "compile s": ("compile_seconds", "{:.1f}"),
                 "variants": ("variants", "{}"), "s / variant": ("compile_per_variant", "{:.1f}"),
                 "peak MB": ("peak_mb", "{:.0f}"), "cache MB": ("cache_mb", "{:.2f}")}


def _progress():
    try:
        from tqdm.auto import tqdm
        return lambda it, desc="": tqdm(it, desc=desc, leave=False)
    except ImportError:
        return lambda it, desc="": it


def _suffix(quick: bool) -> str:
    return "_quick" if quick else ""


def fidelity(args) -> None:
    from .data import digits
    from .fidelity import QUICK, STANDARD, run
    from .metrics import features
    from .models import calibration, load_classifier, load_dit

    if getattr(args, "only_heldout", False):
        return _heldout(args)
    setup = dataclasses.replace(QUICK if args.quick else STANDARD, **{k: v for k, v in (
        ("samples", args.samples), ("steps", args.steps), ("guidance", args.guidance)) if v is not None})
    model, classifier = load_dit(), load_classifier()
    real = features(classifier, digits("all")[0])
    from . import peers as peer_module

    peer_list, unavailable = peer_module.peers(setup.steps, cfg=setup.guidance > 1), peer_module.unavailable()
    if importlib.util.find_spec("cache_dit") is None:
        unavailable["cache-dit"] = "not installed here: pip install -e '.[bench]'"
        peer_list = [p for p in peer_list if p.library != "cache-dit"]
    if args.quick:                                   # diffusers is a dependency: its hooks always run
        peer_list = [p for p in peer_list if p.library == "diffusers"][:1]
    rows, drawn, labels = run(setup, model, classifier, real, peer_list, progress=_progress(),
                              calibration=calibration(model))
    name = "fidelity" + _suffix(args.quick)
    text = (f"{setup.samples} samples per method, DDIM {setup.steps} steps, guidance {setup.guidance}, as "
            f"{setup.samples // setup.batch} requests of {setup.batch} through {setup.inner}; request time: median "
            f"of the requests after the first (warm-up).\n\n"
            + markdown_table(rows, FIDELITY_COLUMNS) + "\n")
    text += _random_vs_kv_norm(rows) + _front_vs_peers(rows)
    if unavailable:
        text += "\nPeers that could not run on this model:\n\n" + "".join(f"- {k}: {v}\n" for k, v in unavailable.items())
    path = write(args.out, name, "Fidelity: every method against the uncached sampler", text, rows, environment(),
                 presets=[f"dit-xl-2:{m}" for m in FIDELITY_PRESETS])
    plot_tradeoff(rows, args.out / f"{name}.png")
    keep = [k for k in drawn if k == "uncached" or "N=3" in k or "preset" in k or k in {p.name for p in peer_list[:4]}]
    sample_grid({k: drawn[k] for k in keep}, labels, args.out / f"samples{_suffix(args.quick)}.png")
    print(path.read_text())
    _heldout(args)


HELDOUT_COLUMNS = {"method": ("method", "{}"), "knob": ("knob", "{}"), "PSNR (dB)": ("psnr", "{:.2f}"),
                   "FLOP ratio": ("flop_ratio", "{:.1%}"), "FLOP speed-up": ("flop_speedup", "{:.2f}x")}


def _heldout(args) -> None:
    """The front on a model the knobs were not picked on (``--quick``: the tiny size, 8 steps)."""
    from .fidelity import HELDOUT, heldout
    from .speed import _model

    setup = dataclasses.replace(HELDOUT, samples=1, batch=1, steps=8) if args.quick else HELDOUT
    methods = ("FORA", "Calibrated") if args.quick else None
    size = "tiny" if args.quick else "DiT-B-like"
    rows = heldout(setup, _model(size, "cpu"), **({"methods": methods} if methods else {}), progress=_progress())
    name = "fidelity_heldout" + _suffix(args.quick)
    text = (f"The {size} DiT (random weights), not the model "
            f"the front's knobs were picked on: {setup.samples} samples, DDIM {setup.steps} steps, guidance "
            f"{setup.guidance}, eager; PSNR against its own uncached run, FLOP speed-up (no wall-clock: eager). "
            "The calibrated rows use ratios calibrated on this model (one request, other seeds).\n\n"
            + markdown_table(rows, HELDOUT_COLUMNS) + "\n")
    path = write(args.out, name, f"Fidelity front on a held-out model ({size})", text, rows, environment(),
                 presets=[f"dit-xl-2:{m}" for m in FIDELITY_PRESETS])
    plot_tradeoff(rows, args.out / f"{name}.png", x="flop_speedup", xlabel="FLOP speed-up vs uncached")
    print(path.read_text())


def _random_vs_kv_norm(rows) -> str:
    """DuCa v2's claim (random token selection is as good as or better than "important" tokens),
    read off the table whichever way it comes out."""
    by = {(r.method, r.knob): r for r in rows}
    pairs = [(k, by[("DuCa v2 (random)", k)], by[("DuCa v1 (kv-norm)", k)]) for (m, k) in by
             if m == "DuCa v2 (random)" and ("DuCa v1 (kv-norm)", k) in by]
    if not pairs:
        return ""
    cells = "; ".join(f"{k}: {v2.psnr - v1.psnr:+.2f} dB PSNR, {v2.fd - v1.fd:+.2f} FD, "
                      f"{v2.accuracy - v1.accuracy:+.1%} accuracy" for k, v2, v1 in pairs)
    wins = sum(v2.psnr >= v1.psnr for _, v2, v1 in pairs)
    return (f"\nRandom (v2) minus kv-norm (v1) selection, same N: {cells}. Random has the higher PSNR "
            f"at {wins} of {len(pairs)} N.\n")


PEER_LIBRARIES = ("cache-dit", "diffusers")


def _front_vs_peers(rows, x: str = "speedup", x_name: str = "speed-up") -> str:
    """Per peer point: the duca rows at least as fast with at least its PSNR (above it), or the
    best PSNR duca has at its speed-up or faster (below it by so much)."""
    ours = [r for r in rows if get(r, "method") != "uncached" and not get(r, "method").startswith(PEER_LIBRARIES)]
    lines = []
    for peer in (r for r in rows if get(r, "method").startswith(PEER_LIBRARIES)):
        px, py = get(peer, x), get(peer, "psnr")
        if get(peer, "flop_ratio") >= 0.999:
            lines.append(f"- {get(peer, 'method')}: never skipped a computation here (FLOP ratio 100%): no point to compare")
            continue
        faster = [r for r in ours if get(r, x) >= px]
        above = sorted((r for r in faster if get(r, "psnr") >= py), key=lambda r: -get(r, "psnr"))
        where = f"{get(peer, 'method')} ({py:.2f} dB at {px:.2f}x)"
        if above:
            best = above[0]
            lines.append(f"- {where}: **above** — {len(above)} duca rows as fast or faster with a PSNR as high or "
                         f"higher; best {get(best, 'method')} {get(best, 'knob')}: {get(best, 'psnr'):.2f} dB at "
                         f"{get(best, x):.2f}x")
        elif faster:
            best = max(faster, key=lambda r: get(r, "psnr"))
            verdict = "equal (within 0.1 dB)" if get(best, "psnr") >= py - 0.1 else "below"
            lines.append(f"- {where}: **{verdict}** — the best duca row as fast or faster, {get(best, 'method')} "
                         f"{get(best, 'knob')}, gives {get(best, 'psnr'):.2f} dB ({get(best, 'psnr') - py:+.2f} dB)")
        else:
            lines.append(f"- {where}: **below** — no duca row is as fast")
    if not lines:
        return ""
    return f"\nWhere duca's rows stand against each peer point ({x_name} and PSNR, this run):\n\n" + "\n".join(lines) + "\n"


def speed(args) -> None:
    if args.world > 1:
        return context_parallel_speed(args)
    from .speed import METHODS, SIZES, peak_rss_mb, plot, run

    sizes = args.sizes or [s for s, spec in SIZES.items() if spec.device == args.device]
    if args.quick:
        sizes, steps, repeats, methods, inner = ["tiny"], 6, 1, ("fora", "duca"), "eager"
    else:
        steps, repeats, methods, inner = args.steps or 50, 3, tuple(args.methods or METHODS), "inductor"
    rows = run(sizes, steps, repeats, methods, inner, progress=_progress())
    memory = "peak allocated CUDA memory" if args.device == "cuda" else "peak resident set of the whole process"
    text = (f"One request per row: batch 2, DDIM steps as listed, no guidance; median of {repeats} after a "
            f"warm-up request, the timed requests round robin over a size's rows; inner compiler {inner}, each compiled row from an empty Inductor cache. "
            f"Compile s: the warm-up request minus a timed one; s / variant: duca's own count per compiled "
            f"variant. Peak MB: {memory} during the row's timed requests, every row of the size compiled and "
            f"alive (the run's overall peak: "
            f"{peak_rss_mb():.0f} MB); cache MB: duca's feature caches.\n\n"
            + markdown_table(rows, SPEED_COLUMNS) + "\n")
    name = "speed" + _suffix(args.quick)
    used = [f"{SIZES[s].registry}:{m}" for s in sizes for m in methods if m in duca_compile.presets()[SIZES[s].registry]]
    path = write(args.out, name, "Speed per model size", text, rows, environment(args.device), presets=used)
    plot(rows, args.out / f"{name}.png")
    print(path.read_text())


def context_parallel_speed(args) -> None:
    import tempfile

    from .context_parallel import MODEL, launch, table

    steps, repeats, inner = (4, 1, "eager") if args.quick else (args.steps or 20, 3, "inductor")
    with tempfile.TemporaryDirectory() as tmp:
        found = launch(args.world, steps, repeats, inner, os.path.join(tmp, "found.json"))
    text = (f"Context parallelism (diffusers' Ulysses) over {found['world']} ranks on {found['device']}, "
            f"{found['threads']} thread(s) per rank: a random-init Flux-like transformer ({MODEL['num_layers']} double "
            f"+ {MODEL['num_single_layers']} single blocks, width {MODEL['num_attention_heads'] * MODEL['attention_head_dim']}, "
            f"{found['tokens']} tokens split over the ranks), batch 1, one request of {steps} transformer calls, "
            f"median of {repeats} timed round robin over the rows after a warm-up request each, inner compiler "
            f"{inner}. Collectives: all-to-alls and "
            "all-gathers in the graph each kind of step runs (plain: Dynamo's graph, every step); steps: counted "
            "over the warm-up and timed requests.\n\n"
            + table(found) + "\n")
    name = f"context_parallel{_suffix(args.quick)}"
    rows = [{**r, "speedup": found["rows"][0]["seconds"] / r["seconds"]} for r in found["rows"]]
    path = write(args.out, name, f"Context parallelism, {found['world']} ranks", text, rows, environment(args.device))
    plot_bars(rows, args.out / f"{name}.png", lambda r: r["method"],
              {"speed-up vs plain CP compile": "speedup", "FLOP ratio per rank": "flop_ratio"}, "ratio",
              f"context parallelism, {found['world']} ranks")
    print(path.read_text())


def flops(args) -> None:
    from duca_compile.full_size_flops import MODELS, flops_table

    models = ["dit-xl-2"] if args.quick else list(MODELS)
    table = flops_table(models, batch=2)
    path = write(args.out, "flops" + _suffix(args.quick), "FLOPs per method on full-size models (meta device, batch 2)",
                 "FLOP speed-up over the uncached model (FLOP ratio), one request, the presets.\n\n" + table, [],
                 environment(), presets=[f"{m}:{meth}" for m in models for meth in duca_compile.presets().get(m, ())])
    print(path.read_text())


def subset_k(args) -> None:
    """One SUBSET compile with symbolic k against one compile per k (and per k bucket)."""
    from .subset_k import BUCKETS, run

    sizes = ["tiny"] if args.quick else ["digits (trained)", "DiT-B-like"]
    ks = (12, 38) if args.quick else (12, 38, 77, 154)
    rows = run(sizes, ks, calls=5 if args.quick else 30, progress=_progress())
    columns = {"size": ("size", "{}"), "k": ("k", "{}"), "static ms": ("static_ms", "{:.2f}"),
               "symbolic ms": ("symbolic_ms", "{:.2f}"), "symbolic / static": ("ratio", "{:.3f}"),
               "bucket": ("bucket", "{}"), "bucket / static": ("bucket_ratio", "{:.3f}"),
               "static compile s": ("static_compile_s", "{:.1f}"), "symbolic compile s (all k)": ("symbolic_compile_s", "{:.1f}")}
    text = (f"The SUBSET variant with every token-wise site at k tokens (batch 2), Inductor, cold cache per "
            f"compile. Per-call time: median of {5 if args.quick else 30} calls of the compiled variant alone, "
            f"the candidates' calls interleaved. Static: one compile per k; symbolic: one compile for every k "
            f"(what duca does). Bucket: the static variant at k rounded up to {BUCKETS}, over the static time "
            f"at k (what rounding k up costs per call; it still compiles once per bucket and per-site bucket "
            f"tuple).\n\n"
            + markdown_table(rows, columns) + "\n")
    name = "subset_k" + _suffix(args.quick)
    path = write(args.out, name, "SUBSET: one compile for every k, or one per k", text, rows, environment())
    _bar_plot(args.out, name)
    print(path.read_text())


def dispatch(args) -> None:
    """Per call and mode: the compiled variant's time against the host time around it."""
    from .dispatch import run

    methods = ("fora", "duca") if args.quick else ("fora", "toca", "duca", "taylorseer", "clusca")
    rows = run(methods, steps=10 if args.quick else 50, progress=_progress())
    columns = {"method": ("method", "{}"), "mode": ("mode", "{}"), "calls": ("calls", "{}"),
               "call ms": ("call_ms", "{:.2f}"), "variant ms": ("variant_ms", "{:.2f}"),
               "host ms": ("host_ms", "{:.3f}"), "variant / FULL": ("vs_full", "{:.3f}"),
               "FLOPs / FULL": ("flops_vs_full", "{:.3f}")}
    text = ("One request after a warm-up one, trained digits DiT, batch 2, Inductor, the DiT presets. Call: "
            "the model call as the sampler sees it; variant: the compiled variant alone; host: the rest "
            "(Dynamo's frame guards and duca's runner), medians per mode.\n\n" + markdown_table(rows, columns) + "\n")
    name = "dispatch" + _suffix(args.quick)
    path = write(args.out, name, "Dispatch: variant time against host time per call", text, rows, environment(),
                 presets=[f"dit-xl-2:{m}" for m in methods])
    _bar_plot(args.out, name)
    print(path.read_text())


def compile_cost(args) -> None:
    """Cold and warm compile seconds per model and preset, each in a fresh process."""
    from .compile import run

    sizes = ["tiny"] if args.quick else (args.sizes or ["tiny", "digits (trained)", "DiT-B-like"])
    methods = ("fora",) if args.quick else tuple(args.methods or ("fora", "toca", "duca", "taylorseer", "clusca"))
    steps = 6 if args.quick else 50
    rows = run(sizes, methods, steps=steps, progress=_progress())
    name = "compile" + _suffix(args.quick)
    if args.keep_other_sizes and (args.out / f"{name}.json").exists():      # measured one size at a time
        import json

        from .compile import Row

        kept = [Row(**r) for r in json.loads((args.out / f"{name}.json").read_text())["rows"] if r["size"] not in sizes]
        rows = kept + rows
    columns = {"size": ("size", "{}"), "method": ("method", "{}"), "cold s": ("cold_s", "{:.1f}"),
               "warm s": ("warm_s", "{:.1f}"), "variants": ("variants", "{}"),
               "warm FX-graph hits": ("warm_hits", "{}"), "warm misses": ("warm_misses", "{}"),
               "cold / plain": ("cold_vs_plain", "{:.2f}x"), "warm / plain warm": ("warm_vs_plain", "{:.2f}x")}
    text = (f"Compile seconds: a process's first {steps}-step request (batch 2, Inductor) minus its second. Cold: "
            "an empty Inductor cache directory; warm: a second process on the directory the cold one filled. "
            "Each measurement is its own process. duca rows use the DiT-XL/2 presets: `<preset>` compiles the "
            "whole model, `<preset> regional` each block (`compile_repeated_blocks(backend=duca)`); variants: "
            "duca's compiles over every block graph.\n\n"
            + markdown_table(rows, columns) + "\n")
    path = write(args.out, name, "Compile cost, cold and warm", text, rows, environment(),
                 presets=[f"dit-xl-2:{r.method.split()[0]}" for r in rows if not r.method.startswith("plain")])
    _bar_plot(args.out, name)
    print(path.read_text())


_BAR_PLOTS = {   # result name -> (group label, series, y label): drawn by the command and by ``plot``
    "subset_k": (lambda r: f"{r['size'].split(' ')[0]} k={r['k']}",
                 {"static": "static_ms", "symbolic": "symbolic_ms"}, "ms per call of the SUBSET variant"),
    "dispatch": (lambda r: f"{r['method']} {r['mode']}", {"variant": "variant_ms", "host": "host_ms"},
                 "ms per call (median)"),
    "compile": (lambda r: f"{r['size'].split(' ')[0]} {r['method']}", {"cold": "cold_s", "warm": "warm_s"},
                "compile seconds"),
}


ADAPTIVE_COLUMNS = {"method": ("method", "{}"), "knob": ("knob", "{}"), "computed steps": ("computed", "{:.1f}"),
                    "PSNR (dB)": ("psnr", "{:.2f}"), "FLOP ratio": ("flop_ratio", "{:.1%}"),
                    "request s": ("seconds", "{:.1f}"), "speed-up vs compile": ("speedup", "{:.2f}x"),
                    "compile s": ("compile_seconds", "{:.1f}"), "host reads / request": ("host_reads", "{:.0f}")}


def adaptive(args) -> None:
    """adaptive caching vs diffusers FirstBlockCache and cache-dit DBCache at the same settings"""
    from .adaptive import QUICK, STANDARD, run
    from .models import load_dit

    if importlib.util.find_spec("cache_dit") is None:
        raise SystemExit("the adaptive benchmark compares with cache-dit: pip install -e '.[bench]'")
    if not args.heldout_only:
        _adaptive_trained(args, QUICK if args.quick else STANDARD, run, load_dit)
    _adaptive_heldout(args)


def _adaptive_trained(args, setup, run, load_dit) -> None:
    rows = run(setup, load_dit(), progress=_progress())
    name = "adaptive" + _suffix(args.quick)
    text = (f"The trained digits DiT, DDIM {setup.steps} steps, guidance {setup.guidance}, requests of {setup.batch} "
            f"samples through {setup.inner}: one warm-up request per row, then {setup.turns} timed turns (one "
            "request per row per turn); request time: their median. Computed steps: steps whose blocks past "
            "the head ran, per request. PSNR against the uncached samples. Host reads: duca's decision reads "
            "(`stats()['decision_reads']`); the peers read the same diff with `.item()` on each step their "
            "threshold decides (not counted here). FLOP ratio: duca's graphs over every timed call; a peer's "
            "from `FlopCounterMode` over one eager request of 2 samples (whose diffs, over a smaller batch, "
            "may decide a step otherwise).\n\n"
            + markdown_table(rows, ADAPTIVE_COLUMNS) + "\n")
    path = write(args.out, name, "Adaptive caching against FirstBlockCache and DBCache", text, rows, environment())
    plot_tradeoff(rows, args.out / f"{name}.png")
    print(path.read_text())


HELDOUT_ADAPTIVE_COLUMNS = {"method": ("method", "{}"), "knob": ("knob", "{}"),
                            "computed steps": ("computed", "{:.0f}"), "PSNR (dB)": ("psnr", "{:.2f}"),
                            "FLOP ratio": ("flop_ratio", "{:.1%}")}


def _adaptive_heldout(args) -> None:
    """The adaptive rows on the held-out DiT-B-like model (``--quick``: the tiny size, 8 steps)."""
    from .adaptive import HELDOUT, heldout
    from .speed import _model

    setup = dataclasses.replace(HELDOUT, steps=8) if args.quick else HELDOUT
    size = "tiny" if args.quick else "DiT-B-like"
    rows = heldout(setup, _model(size, "cpu"), progress=_progress())
    name = "adaptive_heldout" + _suffix(args.quick)
    text = (f"The {size} DiT (random weights), not the model the thresholds were picked on: {setup.batch} "
            f"samples, DDIM {setup.steps} steps, guidance {setup.guidance}, eager, one request per row; PSNR "
            "against its own uncached run.\n\n" + markdown_table(rows, HELDOUT_ADAPTIVE_COLUMNS) + "\n")
    path = write(args.out, name, f"Adaptive caching on a held-out model ({size})", text, rows, environment())
    print(path.read_text())


TWO_THRESHOLD_COLUMNS = {"method": ("method", "{}"), "knob": ("knob", "{}"), "full": ("full", "{:.0f}"),
                         "conservative": ("conservative", "{:.0f}"), "aggressive": ("aggressive", "{:.0f}"),
                         "PSNR (dB)": ("psnr", "{:.2f}"), "FLOP ratio": ("flop_ratio", "{:.1%}")}


def two_thresholds(args) -> None:
    """adaptive decisions choosing DuCa's full / conservative / aggressive steps by two thresholds"""
    from .models import load_dit
    from .two_thresholds import QUICK, STANDARD, run

    setup = QUICK if args.quick else STANDARD
    rows = run(setup, load_dit(), progress=_progress())
    name = "two_thresholds" + _suffix(args.quick)
    text = (f"The trained digits DiT, DDIM {setup.steps} steps, guidance {setup.guidance}, one request of "
            f"{setup.batch} samples per row, duca's variants through the eager inner compiler (no wall-clock). "
            "Each step's diff (block 0's residual against the last full step's) picks the step: above `high` "
            f"full, above `low` conservative ({setup.ratio:.0%} of each site's tokens recomputed past block 0), "
            "else aggressive (every site past block 0 reused). Steps: per kind, per request. PSNR against the "
            "uncached samples; FLOP ratio: the variants run over the uncached model's.\n\n"
            + markdown_table(rows, TWO_THRESHOLD_COLUMNS) + "\n")
    path = write(args.out, name, "Adaptive decisions between DuCa's three steps", text, rows, environment(),
                 presets=("dit-xl-2:duca",))
    plot_tradeoff(rows, args.out / f"{name}.png", x="flop_speedup", xlabel="FLOP speed-up (1 / FLOP ratio)")
    print(path.read_text())


COND_COLUMNS = {"design": ("design", "{}"), "knob": ("knob", "{}"), "computed steps": ("computed", "{:.0f}"),
                "PSNR (dB)": ("psnr", "{:.2f}"), "request s": ("seconds", "{:.2f}"),
                "speed-up vs compile": ("speedup", "{:.2f}x"), "compile s": ("compile_seconds", "{:.1f}"),
                "host reads per request": ("host_reads", "{}")}


def adaptive_cond(args) -> None:
    """the adaptive decision read on the host (duca) against torch.cond in one graph (experiment)"""
    from .adaptive_cond import QUICK, STANDARD, run
    from .models import load_dit

    setup = QUICK if args.quick else STANDARD
    rows = run(setup, load_dit(), progress=_progress())
    name = "adaptive_cond" + _suffix(args.quick)
    text = (f"The trained digits DiT, DDIM {setup.steps} steps, guidance {setup.guidance}, requests of {setup.batch} "
            f"samples through {setup.compiler}: one warm-up request per row, then {setup.turns} timed turns (one "
            "request per row per turn); request time: their median. (a): duca's adaptive runner (HEAD, one host "
            "read, COMPUTE or REUSE); (b): the same three graphs in one compiled function, `torch.cond` choosing, "
            "as the issue proposed. PSNR against plain torch.compile's samples. Host reads: tensor values read on the "
            "host during one more request per row (counted apart from the timed ones; `computed steps` reads the "
            "flags of (b) after each request, outside it).\n\n"
            + markdown_table(rows, COND_COLUMNS) + "\n")
    path = write(args.out, name, "Adaptive decision: host read against torch.cond", text, rows, environment())
    print(path.read_text())


FLOW_COLUMNS = {"steps": ("steps", "{}"), "method": ("method", "{}"), "knob": ("knob", "{}"),
                "PSNR (dB)": ("psnr", "{:.2f}"), "faithful": ("faithful", "{:.1%}"), "shape right": ("shape", "{:.1%}"),
                "FLOP ratio": ("flop_ratio", "{:.1%}"), "notes": ("notes", "{}")}


def flow_fidelity(args) -> None:
    """duca's FLUX presets on the trained flow-matching model: PSNR, caption faithfulness, FLOPs"""
    from .flow import load_flow
    from .flow_fidelity import QUICK, STANDARD, run

    setup = QUICK if args.quick else STANDARD
    rows = run(setup, load_flow(), progress=_progress())
    name = "flow_fidelity" + _suffix(args.quick)
    text = (f"The trained FLUX-like flow model (`benchmarks/flow.py`, `checkpoints/flow_shapes.json`), "
            f"FlowMatchEulerDiscreteScheduler at {' and '.join(map(str, setup.steps))} steps, guidance "
            f"{setup.guidance}, each of the 48 captions {setup.per_caption}x from fixed noise, one request per row "
            "through duca's eager inner compiler (no wall-clock, no peers). PSNR against the uncached samples; "
            "faithful: colour, shape and quadrant all as captioned (`shapes.faithfulness`, exact checks).\n\n"
            + markdown_table(rows, FLOW_COLUMNS) + "\n")
    presets_used = ("flux-dev:toca", "flux-dev:duca", "flux-dev:taylorseer", "flux-dev:hicache", "flux-dev:clusca",
                    "any:fbcache", "any:dbcache-f1b0")
    path = write(args.out, name, "duca's FLUX presets on the trained flow model", text, rows, environment(),
                 presets=presets_used)
    for steps in setup.steps:
        plot_tradeoff([r for r in rows if r.steps == steps], args.out / f"{name}_{steps}.png", x="flop_speedup",
                      xlabel=f"FLOP speed-up, {steps} steps", ylabel="PSNR vs uncached (dB)")
    print(path.read_text())


def _front_columns(score_name: str) -> dict:
    return {"steps": ("steps", "{}"), "method": ("method", "{}"), "knob": ("knob", "{}"),
            "library": ("library", "{}"), "PSNR (dB)": ("psnr", "{:.2f}"), score_name: ("score", "{:.1%}"),
            "FLOP ratio": ("flop_ratio", "{:.1%}"), "request s": ("seconds", "{:.2f}"),
            "speed-up": ("speedup", "{:.2f}x"), "first request s": ("warmup_seconds", "{:.1f}"),
            "notes": ("notes", "{}")}


def _front(args, name: str, title: str, described: str, setup, work, duca, peer_list, presets_used) -> None:
    from .flow_front import best_at, run, standing

    rows, unavailable = run(setup, work, duca, peer_list, progress=_progress())
    name += _suffix(args.quick)
    text = (f"{described} Inner compiler {setup.inner}; peers compiled by plain torch.compile (graph breaks "
            f"and all). Every row in a process of its own: {'yes' if setup.processes else 'no'}. Round robin: "
            f"every row's first request, then {setup.rounds} rounds of one request per row in turn; request s is "
            "the median over the rounds, speed-up the plain torch.compile row's over it. First request s: "
            "Dynamo, Inductor (its on-disk cache as earlier runs left it; cold compiles are in compile.md) and "
            "the first request. PSNR against the plain row's samples (same noise).\n\n"
            + markdown_table(rows, _front_columns(work.score_name))
            + "\n\nWhere duca stands against each peer (same run):\n\n" + "\n".join(standing(rows))
            + "\n\nThe highest PSNR at least this fast (score: " + work.score_name + "):\n\n"
            + "\n".join(best_at(rows)) + "\n")
    if unavailable:
        text += "\nPeers that could not run on this model:\n\n" + "\n".join(
            f"- {k}: {v}" for k, v in unavailable.items()) + "\n"
    path = write(args.out, name, title, text, rows, environment(), presets=presets_used)
    for steps in setup.steps:
        plot_tradeoff([r for r in rows if r.steps == steps and r.flop_ratio < 0.999], args.out / f"{name}_{steps}.png",
                      xlabel=f"wall-clock speed-up vs plain torch.compile, {steps} steps")
    print(path.read_text())


def flow_front(args) -> None:
    """speed/quality fronts on the trained flow model: duca and the peers in one run, timed round robin"""
    from .flow import load_flow
    from .flow_front import QUICK, STANDARD, flow_duca_rows, flow_peer_rows, flow_workload

    setup = QUICK if args.quick else STANDARD
    model = load_flow()
    work = flow_workload(model, setup)
    described = (f"The trained FLUX-like flow model (`benchmarks/flow.py`), FlowMatchEulerDiscreteScheduler at "
                 f"{' and '.join(map(str, setup.steps))} steps, guidance {setup.guidance}, the 48 captions "
                 f"{setup.per_caption}x per request from fixed noise (CFG batched: one call of "
                 f"{96 * setup.per_caption} per step); faithful: colour, shape and quadrant as captioned (exact "
                 "checks).")
    _front(args, "flow_front", "Fronts on the trained flow model: duca and the peers", described, setup, work,
           flow_duca_rows(), flow_peer_rows(model, setup.guidance),
           ("flux-dev:toca", "flux-dev:duca", "flux-dev:taylorseer", "flux-dev:hicache", "flux-dev:foca",
            "flux-dev:clusca"))


def dit_front(args) -> None:
    """speed/quality fronts on the trained digits DiT: duca and the peers in one run, timed round robin"""
    from .flow_front import DIT, QUICK, dit_duca_rows, dit_peer_rows, dit_workload
    from .models import load_classifier, load_dit

    setup = dataclasses.replace(QUICK, guidance=1.5) if args.quick else DIT
    samples = 4 if args.quick else 20
    work = dit_workload(load_dit(), load_classifier(), setup, samples=samples)
    peer_list = dit_peer_rows()
    if args.quick:
        peer_list = [p for p in peer_list if p.library == "diffusers"][:1]
    described = (f"The trained digits DiT (`benchmarks/models.py`), DDIM {' and '.join(map(str, setup.steps))} "
                 f"steps, guidance {setup.guidance}, {samples} samples per request (classes cycling, CFG batched); "
                 "class acc.: the benchmark classifier on the samples.")
    _front(args, "dit_front", "Fronts on the trained digits DiT: duca and the peers", described, setup, work,
           dit_duca_rows(), peer_list, ("dit-xl-2:toca", "dit-xl-2:duca", "dit-xl-2:taylorseer", "dit-xl-2:clusca"))


def _bar_plot(out, name: str) -> None:
    import json

    base = name.removesuffix("_quick")
    rows = json.loads((out / f"{name}.json").read_text())["rows"]
    label, series, ylabel = _BAR_PLOTS[base]
    plot_bars(rows, out / f"{name}.png", label, series, ylabel, title=name)


def replot(args) -> None:
    """Redraw the plots from the JSON results (the sample grid needs a run: its samples are not kept)."""
    import json

    from .speed import Row, plot

    for name in ("fidelity", "fidelity_quick", "adaptive", "adaptive_quick"):
        if (args.out / f"{name}.json").exists():
            plot_tradeoff(json.loads((args.out / f"{name}.json").read_text())["rows"], args.out / f"{name}.png")
    for name in ("fidelity_heldout", "fidelity_heldout_quick"):
        if (args.out / f"{name}.json").exists():
            plot_tradeoff(json.loads((args.out / f"{name}.json").read_text())["rows"], args.out / f"{name}.png",
                          x="flop_speedup", xlabel="FLOP speed-up vs uncached")
    for name in ("speed", "speed_quick"):
        if (args.out / f"{name}.json").exists():
            rows = [Row(**r) for r in json.loads((args.out / f"{name}.json").read_text())["rows"]]
            plot(rows, args.out / f"{name}.png")
    for name in ("flow_front", "flow_front_quick", "dit_front", "dit_front_quick"):
        if (args.out / f"{name}.json").exists():
            rows = json.loads((args.out / f"{name}.json").read_text())["rows"]
            for steps in sorted({r["steps"] for r in rows}):
                plot_tradeoff([r for r in rows if r["steps"] == steps and r["flop_ratio"] < 0.999],
                              args.out / f"{name}_{steps}.png",
                              xlabel=f"wall-clock speed-up vs plain torch.compile, {steps} steps")
    for base in _BAR_PLOTS:
        for name in (base, base + "_quick"):
            if (args.out / f"{name}.json").exists():
                _bar_plot(args.out, name)


def gpu(args) -> None:
    """The prepared GPU check: correctness, speed, CUDA graphs, cache-dit peer (benchmarks/gpu.py)."""
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()      # "modules kept in float32" on every .to(bf16)
    except ImportError:
        pass
    from .gpu import run

    run(args)


def main(argv=None) -> None:
    from .train import train_classifier, train_dit

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the DiT and/or the classifier on this CPU")
    train.add_argument("what", nargs="?", choices=["dit", "classifier", "both", "flow"], default="both",
                       help="flow: the FLUX-like flow-matching model on the captioned shapes (benchmarks/flow.py)")
    train.add_argument("--minutes", type=float, default=55.0, help="DiT training budget")
    redraw = sub.add_parser("plot", help=replot.__doc__.split(" (")[0])
    redraw.add_argument("--out", type=pathlib.Path, default=RESULTS)
    redraw.set_defaults(fn=replot)
    check = sub.add_parser("gpu", help=gpu.__doc__.strip())
    check.add_argument("--out", type=pathlib.Path, required=True, help="folder for gpu.md / gpu.json (created)")
    check.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    check.add_argument("--tiny", action="store_true", help="toy sizes everywhere (minutes on a CPU)")
    check.add_argument("--sections", help="comma-separated subset of correctness,speed,cudagraphs,peer")
    check.add_argument("--inner", choices=["inductor", "aot_eager", "eager"],
                       help="inner compiler (default: inductor; aot_eager for --device cpu --tiny)")
    check.add_argument("--budget-s", type=float, help="seconds the whole check may take (default: 450 on cuda, "
                       "no limit on cpu); a section stops starting rows past its share")
    check.set_defaults(fn=gpu)
    for name, fn in (("fidelity", fidelity), ("speed", speed), ("flops", flops), ("subset_k", subset_k),
                     ("dispatch", dispatch), ("compile", compile_cost), ("adaptive", adaptive),
                     ("two-thresholds", two_thresholds), ("adaptive-cond", adaptive_cond),
                     ("flow-fidelity", flow_fidelity), ("flow-front", flow_front),
                     ("dit-front", dit_front)):
        p = sub.add_parser(name, help=(fn.__doc__ or name).strip())
        p.add_argument("--quick", action="store_true", help="a few minutes on the CPU")
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        p.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder (default: %(default)s)")
        p.set_defaults(fn=fn)
        if name == "fidelity":
            p.add_argument("--samples", type=int)
            p.add_argument("--steps", type=int)
            p.add_argument("--guidance", type=float)
            p.add_argument("--only-heldout", action="store_true", help="only the held-out DiT-B-like front")
        if name == "adaptive":
            p.add_argument("--heldout-only", action="store_true", help="only the held-out DiT-B-like rows")
        if name in ("speed", "compile"):
            p.add_argument("--sizes", nargs="+", help="default: every size of --device")
            p.add_argument("--methods", nargs="+", help="presets to time (default: all)")
        if name == "speed":
            p.add_argument("--steps", type=int)
            p.add_argument("--world", type=int, default=1,
                           help="> 1: duca on context parallelism over this many ranks (torchrun)")
        if name == "compile":
            p.add_argument("--keep-other-sizes", action="store_true",
                           help="keep the rows of sizes not run now from the existing results")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    with torch.no_grad():
        if args.command == "train":
            if args.what in ("classifier", "both"):
                train_classifier()
            if args.what in ("dit", "both"):
                with torch.enable_grad():
                    train_dit(args.minutes)
            if args.what == "flow":
                from .flow import train_flow

                with torch.enable_grad():
                    train_flow(args.minutes)
        else:
            args.fn(args)


if __name__ == "__main__":
    main()
