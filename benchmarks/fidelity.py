"""``python -m benchmarks fidelity [--quick]``: every method, with a sweep of its main knob, and the
front sweeps (TaylorSeer warm-up / interval / order, FORA with warm-up or ``compute_first``,
calibrated MagCache-style schedules) against the uncached sampler (same noise, same labels) on the
trained DiT, and the peers on the same model; then the front on a held-out random DiT-B-like model.

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
from duca_compile import CalibratedConfig, FORAConfig, TaylorSeerConfig, presets

from .metrics import accuracy, features, frechet_distance, psnr, ssim
from .sampling import request_starter, sample, starts

__all__ = ["Setup", "QUICK", "STANDARD", "HELDOUT", "duca_methods", "run", "heldout"]


@dataclass(frozen=True)
class Setup:
    samples: int          # images per method
    batch: int            # samples per request (the first request is the warm-up)
    steps: int            # DDIM steps
    guidance: float       # classifier-free guidance scale (1 = off)
    inner: str            # how every method is compiled: "inductor" | "eager"
    sweep: tuple          # the knob values swept for FORA and DuCa
    ratio: float = 0.25   # R of the token-wise methods (constant: see ``duca_methods``)
    front: tuple = ()     # which front sweeps to add: "taylorseer", "warm-up", "compute_first", "calibrated"


FRONTS = ("taylorseer", "warm-up", "compute_first", "calibrated")
# DiT-XL/2's evaluation setting in the official DuCa code: DDIM 50, guidance 1.5
QUICK = Setup(samples=10, batch=5, steps=8, guidance=1.5, inner="eager", sweep=(3,), front=("calibrated",))
STANDARD = Setup(samples=400, batch=100, steps=50, guidance=1.5, inner="inductor", sweep=(2, 3, 4, 5), front=FRONTS)

# The front sweeps' knob values, picked by a 20-sample eager pilot on this model (so they are tuned to it:
# the held-out random DiT-B-like front checks them elsewhere). TaylorSeer: (interval, warm-up, order, phase);
# calibrated: (threshold, max skip, retention, order); the last calibrated row is diffusers MagCache's
# settings in this benchmark (threshold 0.12, max skip 4, retention 0.2), compiled.
TAYLORSEER_FRONT = ((3, 6, 1, "official"), (4, 6, 2, "official"), (4, 6, 1, "diffusers"), (5, 6, 1, "official"))
CALIBRATED_FRONT = ((0.06, 2, 0.12, 1), (0.12, 3, 0.12, 1), (0.2, 3, 0.12, 1), (0.3, 4, 0.12, 1), (0.12, 4, 0.2, 0))


# The dit-xl-2 presets duca_methods builds rows from (stored as fingerprints with the results).
FIDELITY_PRESETS = ("toca", "duca", "duca-v1", "taylorseer", "clusca")


def duca_methods(setup: Setup, calibration=None) -> list[tuple[str, str, object]]:
    """(method, knob, config): FORA N; ToCa; DuCa v2 (random) and v1 (kv-norm) N; TaylorSeer; ClusCa;
    then the front sweeps ``setup.front`` names (``calibration``: the ``Calibration`` the calibrated
    schedules use).

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
    if "taylorseer" in setup.front:
        rows += [("TaylorSeer front", f"N={n} W={w} O={o}" + (" diffusers phase" if ph == "diffusers" else ""),
                  TaylorSeerConfig(interval=n, first_enhance=w, max_order=o, phase=ph))
                 for n, w, o, ph in TAYLORSEER_FRONT]
    if "warm-up" in setup.front:                       # FORA with TaylorSeer's warm-up: order 0
        rows.append(("FORA + warm-up", "N=2 W=6", TaylorSeerConfig(interval=2, first_enhance=6, max_order=0)))
    if "compute_first" in setup.front:                 # cache-dit's Fn: the first block computes every step
        rows.append(("FORA + compute_first", "N=3 F=1", FORAConfig(interval=3, compute_first=1)))
    if "calibrated" in setup.front:
        if calibration is None:
            raise ValueError("the calibrated front needs a Calibration")
        rows += [("Calibrated", f"thr={t} skip={m} ret={r} O={o}",
                  CalibratedConfig(mag_ratios=calibration.mag_ratios, threshold=t, max_skip=m, retention=r, max_order=o))
                 for t, m, r, o in CALIBRATED_FRONT]
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


def run(setup: Setup, model, classifier, real_features, peers=(), progress=lambda it, **kw: it,
        calibration=None) -> tuple:
    """Every row of the fidelity table, and the samples drawn (for the grid)."""
    noise, labels = starts(setup.samples)
    reference, warm, base = _requests(_denoiser(_compile(model, None, setup)), setup, noise, labels)

    def row(method, knob, out, flop_ratio, warm_s, med_s, notes=""):
        return Row(method, knob, psnr(out, reference), ssim(out, reference), accuracy(classifier, out, labels),
                   frechet_distance(features(classifier, out), real_features), flop_ratio, med_s, base / med_s,
                   max(warm_s - med_s, 0.0), notes)

    rows = [row("uncached", "-", reference, 1.0, warm, base)]
    drawn = {"uncached": reference}
    for method, knob, config in progress(duca_methods(setup, calibration), desc="duca methods"):
        out, *rest = _duca(model, config, setup, noise, labels)
        rows.append(row(method, knob, out, *rest))
        drawn[f"{method} {knob}"] = out
    for peer in progress(list(peers), desc="peers"):
        out, *rest = _peer(model, peer, setup, noise, labels)
        knob = ", ".join(f"{k} {v}" for k, v in peer.settings.items() if k not in ("cfg", "calibrated"))
        rows.append(row(peer.name.split(" (")[0], knob, out, *rest))
        drawn[peer.name] = out
    return rows, drawn, labels


# The held-out model: DiT-B-like (12 layers, width 768), random weights, eager; PSNR against its own
# uncached run only (its samples mean nothing). Its rows: the front sweeps and the main methods' middle knobs.
HELDOUT = Setup(samples=2, batch=2, steps=50, guidance=1.5, inner="eager", sweep=(2, 3), front=FRONTS)
HELDOUT_METHODS = ("FORA", "DuCa v2 (random)", "TaylorSeer", "TaylorSeer front", "FORA + warm-up",
                   "FORA + compute_first", "Calibrated")


@dataclass
class HeldOutRow:
    method: str
    knob: str
    psnr: float
    flop_ratio: float
    flop_speedup: float


def heldout(setup: Setup, model, methods=HELDOUT_METHODS, progress=lambda it, **kw: it) -> list:
    """PSNR and FLOP ratio of the front's methods on another model, calibrated on that model."""
    from duca_compile import calibrate

    noise, labels = starts(setup.samples)
    cal_noise, cal_labels = starts(setup.samples, seed=123)
    calibration = calibrate(model, lambda: sample(_denoiser(model), cal_noise, cal_labels, setup.steps,
                                                  setup.guidance))
    reference = sample(_denoiser(model), noise, labels, setup.steps, setup.guidance)
    rows = []
    for method, knob, config in progress([m for m in duca_methods(setup, calibration) if m[0] in methods],
                                         desc="held-out"):
        out, flop_ratio, *_ = _duca(model, config, setup, noise, labels)
        rows.append(HeldOutRow(method, knob, psnr(out, reference), flop_ratio, 1 / flop_ratio))
    return rows
