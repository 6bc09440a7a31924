"""``python -m benchmarks fidelity [--quick]``: every method, with a sweep of its main knob, against
the uncached sampler (same noise, same labels) on the trained DiT, and the peers on the same model.

Each method draws its samples as consecutive requests of ``batch`` samples through a compiled
model (Inductor; ``--quick``: eager): the first request is the warm-up, reported as compile time
(minus a timed request), the median of the others is the request wall-clock. The uncached samples
come from plain ``torch.compile``, so the speed-up is against it. Per row: PSNR and SSIM against the
uncached samples; class accuracy (the benchmark classifier); FD, FID's formula in the classifier's
feature space, against the real digits; the FLOP ratio executed (duca: its variants' FLOPs ×
calls; peers: ``FlopCounterMode`` over a small eager request).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

import duca_compile
from duca_compile import FORAConfig, presets

from .metrics import accuracy, features, frechet_distance, psnr, ssim
from .sampling import request_starter, sample, starts

__all__ = ["Setup", "QUICK", "STANDARD", "duca_methods", "run"]


@dataclass(frozen=True)
class Setup:
    samples: int          # images per method
    batch: int            # samples per request (the first request is the warm-up)
    steps: int            # DDIM steps
    guidance: float       # classifier-free guidance scale (1 = off)
    inner: str            # how every method is compiled: "inductor" | "eager"
    sweep: tuple          # the knob values swept for FORA and DuCa
    ratio: float = 0.25   # R of the token-wise methods (constant: see ``duca_methods``)


# DiT-XL/2's evaluation setting in the official DuCa code: DDIM 50, guidance 1.5
QUICK = Setup(samples=10, batch=5, steps=8, guidance=1.5, inner="eager", sweep=(3,))
STANDARD = Setup(samples=500, batch=100, steps=50, guidance=1.5, inner="inductor", sweep=(2, 3, 4, 5, 6))


def duca_methods(setup: Setup) -> list[tuple[str, str, object]]:
    """(method, knob, config): FORA N; ToCa; DuCa v2 (random) and v1 (kv-norm) N; TaylorSeer; ClusCa.

    ToCa and DuCa keep the DiT-XL/2 presets' step rules (DDIM counting down, interval
    ``N / (1.4 − 0.8 x/T)``, forced 2 on int(0.2T) <= x < int(0.4T)) and scores (staleness, spatial bonus), with a
    constant ratio instead of the ToCa-ddim50 schedule: that schedule gives almost every conservative
    step its own k, ~20 compiled variants per config, which the speed benchmark times on the exact
    presets. TaylorSeer and ClusCa are the presets."""
    token_wise = dict(ratio=setup.ratio, ratio_schedule=None)
    rows = [("FORA", f"N={n}", FORAConfig(interval=n)) for n in setup.sweep]
    rows.append(("ToCa", f"N=3 R={setup.ratio}", dataclasses.replace(presets("dit-xl-2", "toca"), **token_wise)))
    for name, preset in (("DuCa v2 (random)", "duca"), ("DuCa v1 (kv-norm)", "duca-v1")):
        rows += [(name, f"N={n}", dataclasses.replace(presets("dit-xl-2", preset), interval=n, **token_wise))
                 for n in setup.sweep]
    rows.append(("TaylorSeer", "preset", presets("dit-xl-2", "taylorseer")))
    rows.append(("ClusCa", "preset", presets("dit-xl-2", "clusca")))
    return rows


def _denoiser(fn):
    return lambda x, t, y: fn(x, timestep=t, class_labels=y).sample


def _requests(denoise, setup: Setup, noise, labels, before=lambda: None) -> tuple[torch.Tensor, float, float]:
    """(samples, warm-up seconds, median seconds of the other requests)."""
    out, times = [], []
    for sl in range(0, setup.samples, setup.batch):
        before()
        start = time.perf_counter()
        out.append(sample(denoise, noise[sl:sl + setup.batch], labels[sl:sl + setup.batch], setup.steps,
                          setup.guidance))
        times.append(time.perf_counter() - start)
    return torch.cat(out), times[0], statistics.median(times[1:] or times)


def _compile(model, backend, setup: Setup, fullgraph=True):
    torch._dynamo.reset()
    if backend is None and setup.inner == "eager":
        return model
    return torch.compile(model, backend=backend or "inductor", fullgraph=fullgraph, dynamic=False)


def _duca(model, config, setup: Setup, noise, labels):
    fast = _compile(model, duca_compile.duca_backend(config, inner=setup.inner), setup)
    with request_starter(fast, setup.steps) as before:          # each request is one sampling() request
        out, warm, med = _requests(_denoiser(fast), setup, noise, labels, before)
    s = duca_compile.stats(fast)
    if s["cache_hits"] == 0:
        raise RuntimeError(f"duca: no cache hit with {config!r}: the method never engaged")
    return out, s["flop_ratio"], warm, med, ""


def _peer(model, peer, setup: Setup, noise, labels):
    """Peers run compiled the way their users compile them (graph breaks and all); a peer that
    cannot be compiled runs eagerly, and the row says so."""
    from torch.utils.flop_counter import FlopCounterMode

    n, notes = min(setup.batch, 10), ""
    peer.apply(model, setup.steps)
    try:
        with FlopCounterMode(display=False) as counted:            # FLOPs: a ratio, one small request
            peer.new_request(model, setup.steps)
            sample(lambda x, t, y: peer.call(model, x, timestep=t, class_labels=y).sample, noise[:n], labels[:n],
                   setup.steps, setup.guidance)
        try:
            fn = _compile(model, None, setup, fullgraph=False)
            call = lambda x, t, y: peer.call(fn, x, timestep=t, class_labels=y).sample      # noqa: E731
            out, warm, med = _requests(call, setup, noise, labels, lambda: peer.new_request(model, setup.steps))
        except Exception as e:  # noqa: BLE001 - recorded in the table
            notes = f"compiled run failed ({type(e).__name__}); eager"
            call = lambda x, t, y: peer.call(model, x, timestep=t, class_labels=y).sample   # noqa: E731
            out, warm, med = _requests(call, setup, noise, labels, lambda: peer.new_request(model, setup.steps))
    finally:
        peer.remove(model)
    with FlopCounterMode(display=False) as plain:
        sample(_denoiser(model), noise[:n], labels[:n], setup.steps, setup.guidance)
    return out, counted.get_total_flops() / plain.get_total_flops(), warm, med, notes


@dataclass
class Row:
    method: str
    knob: str
    psnr: float
    ssim: float
    accuracy: float
    fd: float
    flop_ratio: float
    seconds: float            # one request of ``batch`` samples (median)
    speedup: float            # plain torch.compile's request time / this method's
    compile_seconds: float    # the warm-up request minus a timed one
    notes: str = ""


def run(setup: Setup, model, classifier, real_features, peers=(), progress=lambda it, **kw: it) -> tuple:
    """Every row of the fidelity table, and the samples drawn (for the grid)."""
    noise, labels = starts(setup.samples)
    reference, warm, base = _requests(_denoiser(_compile(model, None, setup)), setup, noise, labels)

    def row(method, knob, out, flop_ratio, warm_s, med_s, notes=""):
        return Row(method, knob, psnr(out, reference), ssim(out, reference), accuracy(classifier, out, labels),
                   frechet_distance(features(classifier, out), real_features), flop_ratio, med_s, base / med_s,
                   max(warm_s - med_s, 0.0), notes)

    rows = [row("uncached", "-", reference, 1.0, warm, base)]
    drawn = {"uncached": reference}
    for method, knob, config in progress(duca_methods(setup), desc="duca methods"):
        out, *rest = _duca(model, config, setup, noise, labels)
        rows.append(row(method, knob, out, *rest))
        drawn[f"{method} {knob}"] = out
    for peer in progress(list(peers), desc="peers"):
        out, *rest = _peer(model, peer, setup, noise, labels)
        knob = ", ".join(f"{k} {v}" for k, v in peer.settings.items() if k not in ("cfg", "calibrated"))
        rows.append(row(peer.name.split(" (")[0], knob, out, *rest))
        drawn[peer.name] = out
    return rows, drawn, labels
