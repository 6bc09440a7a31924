"""``python -m benchmarks flow-front [--quick]``: the speed/quality fronts on the trained flow model
(``benchmarks.flow``): duca's methods and the peers (diffusers' hooks, cache-dit) in one run, at 20
and 50 steps.

Every row gets its own copy of the transformer: duca's rows compiled by duca (Inductor inside), the
peers' rows with their hooks applied and compiled by plain ``torch.compile`` as their users run them
(graph breaks and all; a peer that fails compiled runs eagerly and says so), and one plain
``torch.compile`` row, the uncached reference. Timing is round robin: every row's first request
(compile and warm-up, reported apart) runs, then ``rounds`` rounds each run one request of every row
in turn, so drift in the machine's speed lands on all rows alike. With ``Setup.processes`` every row
lives in a process of its own and the parent starts the requests in turn: peers' hooks recompile
their frames every step, and in one process their cache entries on the model's forward code pushed
duca's rows past Dynamo's recompile limit (their forward then ran piecewise), and every compiled
row's guard checks walked the others' entries. A row's wall-clock is the median
of its rounds; its speed-up, the plain row's median over it. Quality comes from the first round:
PSNR against the plain row's samples (same noise) and caption faithfulness (exact checks). FLOPs:
duca's own count for the round's request; a peer's, ``FlopCounterMode`` over a small eager request
against the plain model's.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

import duca_compile
from duca_compile import AdaptiveConfig, FORAConfig, TaylorSeerConfig, presets

from . import peers as peer_lib
from .flow import FlowModel, sample_flow
from .flow_fidelity import _inputs
from .metrics import psnr
from .shapes import faithfulness

__all__ = ["Setup", "QUICK", "STANDARD", "DIT", "Row", "Workload", "flow_workload", "dit_workload",
           "flow_duca_rows", "flow_peer_rows", "dit_duca_rows", "dit_peer_rows", "run", "standing", "best_at"]


@dataclass(frozen=True)
class Setup:
    steps: tuple = (20, 50)
    guidance: float = 3.0
    per_caption: int = 1        # samples per caption per request (48 captions)
    rounds: int = 3
    inner: str = "inductor"     # "eager": no compile anywhere (the quick check of the code path)
    processes: bool = False     # every row in a process of its own (see the module's docstring)


QUICK = Setup(steps=(6,), rounds=1, inner="eager")
STANDARD = Setup(rounds=5, processes=True)
# the digits DiT as in the fidelity table: DDIM 50, guidance 1.5
DIT = Setup(steps=(50,), guidance=1.5, rounds=5, processes=True)


@dataclass
class Row:
    steps: int
    method: str
    knob: str
    library: str
    psnr: float
    score: float                # caption faithfulness (flow) or class accuracy (DiT)
    flop_ratio: float
    seconds: float              # median request wall-clock over the rounds
    speedup: float              # the plain row's median / this row's
    warmup_seconds: float       # the first request (compile included)
    notes: str = ""


THRESHOLD, WARMUP = 0.2, 3      # the adaptive rows, duca's and the peers', at one setting


def flow_duca_rows() -> list[tuple[str, str, object]]:
    return [
        ("FORA", "N=2", FORAConfig(interval=2)),
        ("FORA", "N=3", FORAConfig(interval=3)),
        ("FORA", "N=4", FORAConfig(interval=4)),
        ("ToCa", "preset flux-dev", presets("flux-dev", "toca")),
        ("DuCa", "preset flux-dev", presets("flux-dev", "duca")),
        ("TaylorSeer", "N=4 O=1 W=3", TaylorSeerConfig(interval=4, max_order=1, first_enhance=3)),
        ("TaylorSeer", "N=3 O=1 W=6", TaylorSeerConfig(interval=3, max_order=1, first_enhance=6)),
        ("TaylorSeer", "preset flux-dev", presets("flux-dev", "taylorseer")),
        ("HiCache", "preset flux-dev", presets("flux-dev", "hicache")),
        ("FoCa", "N=3 W=3", TaylorSeerConfig(interval=3, first_enhance=3, forecast="foca")),
        ("FoCa", "preset flux-dev", presets("flux-dev", "foca")),
        # the captions have 3 text tokens: ClusCa clusters each stream, so K is at most 3 there
        ("ClusCa", "preset flux-dev, K=3", dataclasses.replace(presets("flux-dev", "clusca"), clusters=3)),
        ("adaptive", f"F1B0 {THRESHOLD} W={WARMUP}", AdaptiveConfig(threshold=THRESHOLD, warmup=WARMUP)),
        ("adaptive + TaylorSeer", f"F1B0 {THRESHOLD} W={WARMUP}",
         AdaptiveConfig(threshold=THRESHOLD, warmup=WARMUP, forecast="taylorseer")),
        ("adaptive + FoCa", f"F1B0 {THRESHOLD} W={WARMUP}",
         AdaptiveConfig(threshold=THRESHOLD, warmup=WARMUP, forecast="foca")),
    ]


def flow_peer_rows(model: FlowModel, guidance: float) -> list[peer_lib.Peer]:
    """The adaptive peers at duca's adaptive setting (same decisions by construction, so the rows
    compare execution), diffusers' TaylorSeerCache at duca's TaylorSeer N=4 schedule, and
    MagCache at the digits DiT's setting, calibrated on a request of other noise (``_calibration``)."""
    def dbcache(label, **calibrator):
        cfg = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=THRESHOLD,
                   max_warmup_steps=WARMUP)
        return peer_lib.CacheDiT(f"cache-dit DBCache F1B0{label}", "cache-dit", {"threshold": THRESHOLD, "warmup": WARMUP},
                                 config=cfg, **calibrator)

    return [
        dbcache(""),
        dbcache(" + TaylorSeer", taylorseer_order=1, encoder_calibrator=True),
        dbcache(" + FoCa", foca=True),
        peer_lib.FirstBlockCache("diffusers FirstBlockCache", "diffusers", {"threshold": THRESHOLD},
                                 threshold=THRESHOLD),
        peer_lib.TaylorSeerCache("diffusers TaylorSeerCache", "diffusers", {"interval": 4, "warmup": 3, "order": 1},
                                 interval=4, warmup=3, order=1, targets=None),
        peer_lib.MagCache("diffusers MagCache", "diffusers", {"threshold": 0.12, "max_skip": 4, "retention": 0.2},
                          threshold=0.12, max_skip=4, retention=0.2,
                          calibration=functools.partial(_calibration, model, guidance)),
    ]


def _calibration(model: FlowModel, guidance: float, call, num_steps: int, cfg: bool = True) -> torch.Tensor:
    """MagCache's calibration request on the flow model: the 48 captions from noise the fronts do
    not use (seed 7), through ``call`` in place of the transformer."""
    captions, noise, tokens = _inputs(1, seed=7)
    return sample_flow(model, noise, tokens, num_steps, guidance if cfg else 1.0, transformer=call)


def dit_duca_rows() -> list[tuple[str, str, object]]:
    dit = "dit-xl-2"
    return [
        ("FORA", "N=2", FORAConfig(interval=2)),
        ("FORA", "N=3", FORAConfig(interval=3)),
        ("FORA", "N=4", FORAConfig(interval=4)),
        ("ToCa", "preset", presets(dit, "toca")),
        ("DuCa", "preset", presets(dit, "duca")),
        ("TaylorSeer", "preset", presets(dit, "taylorseer")),
        ("TaylorSeer", "N=3 O=1 W=6", TaylorSeerConfig(interval=3, max_order=1, first_enhance=6)),
        ("HiCache", "N=4 O=2 W=2", TaylorSeerConfig(interval=4, max_order=2, first_enhance=2, forecast="hermite")),
        ("FoCa", "N=4 W=2", TaylorSeerConfig(interval=4, first_enhance=2, forecast="foca")),
        ("FoCa", "N=3 W=6", TaylorSeerConfig(interval=3, first_enhance=6, forecast="foca")),
        ("ClusCa", "preset", presets(dit, "clusca")),
        ("adaptive", "F1B0 0.24 W=6", AdaptiveConfig(threshold=0.24, warmup=6)),
        ("adaptive + TaylorSeer", "F1B0 0.12 W=6", AdaptiveConfig(threshold=0.12, warmup=6, forecast="taylorseer")),
        ("adaptive + FoCa", "F1B0 0.12 W=6", AdaptiveConfig(threshold=0.12, warmup=6, forecast="foca")),
    ]


def dit_peer_rows() -> list[peer_lib.Peer]:
    """The fidelity table's peers (``peers.peers(50)``: the adaptive ones at the settings of duca's
    adaptive rows above, MagCache calibrated on its default DDIM request) and cache-dit with its
    FoCa calibrator at duca's adaptive + FoCa setting."""
    foca = peer_lib.CacheDiT("cache-dit DBCache F1B0 + FoCa", "cache-dit", {"threshold": 0.12, "warmup": 6},
                             config=dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.12,
                                         max_warmup_steps=6), foca=True)
    return [*peer_lib.peers(50), foca]


@dataclass
class Workload:
    """What the rows share: the module each row copies, how a request draws images with a callable
    of the module's signature (``draw(net, steps)``; ``draw_small``: a small request, for FLOP counts)
    and the quality score of a request's images (0..1)."""

    name: str
    module: torch.nn.Module
    draw: Callable
    draw_small: Callable
    score: Callable
    score_name: str
    recipe: tuple = ()          # (builder, args): how a row's process builds the same workload


def flow_workload(model: FlowModel, setup: Setup) -> Workload:
    captions, noise, tokens = _inputs(setup.per_caption)

    def draw(net, steps, n=None):
        return sample_flow(model, noise[:n], tokens[:n], steps, setup.guidance, transformer=net)

    return Workload("flow", model.transformer, draw, lambda net, steps: draw(net, steps, 4),
                    lambda images: faithfulness(images, captions)["all"], "faithful", (flow_workload, (model, setup)))


def dit_workload(model, classifier, setup: Setup, samples: int = 20) -> Workload:
    from .metrics import accuracy
    from .sampling import sample, starts

    noise, labels = starts(samples)

    def draw(net, steps, n=None):
        return sample(lambda x, t, y: net(x, timestep=t, class_labels=y).sample, noise[:n], labels[:n], steps,
                      setup.guidance)

    return Workload("dit", model, draw, lambda net, steps: draw(net, steps, 4),
                    lambda images: accuracy(classifier, images, labels), "class acc.",
                    (dit_workload, (model, classifier, setup, samples)))


class _Entry:
    """One row: ``request(steps)`` draws a request's images; ``flop_ratio(steps)`` of a request."""

    def __init__(self, work: Workload, method, knob, library):
        self.work, self.method, self.knob, self.library, self.notes = work, method, knob, library, ""

    def request(self, steps): raise NotImplementedError
    def flop_ratio(self, steps): raise NotImplementedError

    def timed(self, steps: int) -> tuple[torch.Tensor, float]:
        """A request's images and its wall-clock seconds."""
        start = time.perf_counter()
        out = self.request(steps)
        return out, time.perf_counter() - start

    def close(self) -> None:
        pass


class _Plain(_Entry):
    def __init__(self, work: Workload, setup: Setup):
        super().__init__(work, "plain torch.compile", "-", "torch")
        net = copy.deepcopy(work.module)
        self.net = net if setup.inner == "eager" else torch.compile(net, dynamic=False)

    def request(self, steps):
        return self.work.draw(self.net, steps)

    def flop_ratio(self, steps):
        return 1.0


class _Duca(_Entry):
    def __init__(self, work: Workload, setup: Setup, method, knob, config):
        super().__init__(work, method, knob, "duca")
        self.fast = torch.compile(copy.deepcopy(work.module), dynamic=False, fullgraph=True,
                                  backend=duca_compile.duca_backend(config, inner=setup.inner))
        self.last = (0, 0)

    def request(self, steps):
        before = self._counts()
        with duca_compile.sampling(self.fast, num_steps=steps):
            out = self.work.draw(self.fast, steps)
        after = self._counts()
        self.last = (after[0] - before[0], after[1] - before[1])
        if duca_compile.stats(self.fast, flops=False)["cache_hits"] == 0:
            self.notes = "no cache hit"
        return out

    def _counts(self):
        from duca_compile.runtime import state_of

        if state_of(self.fast) is None:            # before its first call
            return 0, 0
        s = duca_compile.stats(self.fast)
        return s.get("flops_run", 0), s.get("flops_full", 0)

    def flop_ratio(self, steps):
        run_, full = self.last
        return run_ / full if full else float("nan")


class _Peer(_Entry):
    def __init__(self, work: Workload, setup: Setup, peer: peer_lib.Peer):
        super().__init__(work, peer.name, ", ".join(f"{k} {v}" for k, v in peer.settings.items()
                                                    if k not in ("cfg", "calibrated")), peer.library)
        self.peer = peer
        self.net = copy.deepcopy(work.module)
        self.compiled = self.net if setup.inner == "eager" else torch.compile(self.net, dynamic=False)

    def _draw(self, net, steps, draw):
        self.peer.new_request(self.net, steps)
        return draw(lambda *a, **kw: self.peer.call(net, *a, **kw), steps)

    def request(self, steps):
        if self.compiled is not self.net:
            try:
                return self._draw(self.compiled, steps, self.work.draw)
            except Exception as e:  # noqa: BLE001 - recorded in the table
                self.notes, self.compiled = f"compiled run failed ({type(e).__name__}); eager", self.net
        return self._draw(self.net, steps, self.work.draw)

    def flop_ratio(self, steps):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counted:
            self._draw(self.net, steps, self.work.draw_small)
        with FlopCounterMode(display=False) as plain:
            self.work.draw_small(self.work.module, steps)
        return counted.get_total_flops() / plain.get_total_flops()


def _entry(work: Workload, setup: Setup, spec: tuple) -> _Entry:
    """A row from its spec: ("plain",), ("duca", method, knob, config) or ("peer", peer)."""
    kind, *rest = spec
    return {"plain": _Plain, "duca": _Duca, "peer": _Peer}[kind](work, setup, *rest)


def _why(err: Exception) -> str:
    return str(err) if isinstance(err, _RowFailed) else f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


class _RowFailed(RuntimeError):
    """A row's process reported an error (its text: ``_why`` of the error there)."""


def _serve(conn, recipe: tuple, setup: Setup, spec: tuple) -> None:
    """A row's process: builds the workload and the row, then answers the parent's requests."""
    import warnings

    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    builder, args = recipe
    try:
        entry = _entry(builder(*args), setup, spec)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", _why(err)))
        return
    conn.send(("ok", (entry.method, entry.knob, entry.library)))
    while True:
        what, *args = conn.recv()
        if what == "close":
            return
        try:
            if what == "timed":
                out, seconds = entry.timed(*args)
                answer = (out, seconds, entry.notes)
            else:
                answer = entry.flop_ratio(*args)
            conn.send(("ok", answer))
        except Exception as err:  # noqa: BLE001 - the parent decides: a peer's is reported, duca's raised
            conn.send(("error", _why(err)))


class _Remote(_Entry):
    """A row served by a process of its own (``_serve``); the parent only starts its requests."""

    def __init__(self, work: Workload, setup: Setup, spec: tuple, context):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, work.recipe, setup, spec), daemon=True)
        self.process.start()
        self.method, self.knob, self.library = self._ask()
        self.notes = ""

    def _ask(self, *message):
        if message:
            self.conn.send(message)
        status, value = self.conn.recv()
        if status == "error":
            raise _RowFailed(value)
        return value

    def timed(self, steps):
        out, seconds, self.notes = self._ask("timed", steps)
        return out, seconds

    def flop_ratio(self, steps):
        return self._ask("flops", steps)

    def close(self):
        if self.process.is_alive():
            self.conn.send(("close",))
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()


@torch.no_grad()
def run(setup: Setup, work: Workload, duca: list, peers: list, progress=lambda it, **kw: it) -> tuple[list, dict]:
    """Rows per step count, and the peers that could not run (name -> why)."""
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = 64        # in one process: one cache entry per row's model copy
    specs = [("plain",)] + [("duca", *r) for r in duca] + [("peer", p) for p in peers]
    context = None
    if setup.processes:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
    entries: list[_Entry] = []
    try:
        for spec in progress(specs, desc="rows"):
            entries.append(_Remote(work, setup, spec, context) if context else _entry(work, setup, spec))
        return _rounds(setup, work, entries, progress)
    finally:
        for e in entries:
            e.close()


def _rounds(setup: Setup, work: Workload, entries: list, progress) -> tuple[list, dict]:
    unavailable, rows = {}, []
    for steps in setup.steps:
        warm = {}
        for e in progress(list(entries), desc=f"{steps} steps: first requests"):
            try:
                warm[e], e.warm_s = e.timed(steps)
            except Exception as err:  # noqa: BLE001 - a peer that cannot run on this model is reported
                if e.library in ("duca", "torch"):
                    raise
                unavailable[e.method] = _why(err)
        live = [e for e in entries if e in warm]
        times: dict = {e: [] for e in live}
        images, flops = {}, {}
        for r in progress(range(setup.rounds), desc=f"{steps} steps: rounds"):
            for e in live:
                out, seconds = e.timed(steps)
                times[e].append(seconds)
                if r == 0:
                    images[e] = out
                    if e.library == "duca":
                        flops[e] = e.flop_ratio(steps)
        for e in live:
            if e not in flops:
                flops[e] = e.flop_ratio(steps)
        plain = entries[0]
        base = statistics.median(times[plain])
        for e in live:
            med = statistics.median(times[e])
            rows.append(Row(steps, e.method, e.knob, e.library, psnr(images[e], images[plain]), work.score(images[e]),
                            flops[e], med, base / med, e.warm_s, e.notes))
    return rows, unavailable


def standing(rows: list[Row]) -> list[str]:
    """Per peer row: whether some caching duca row at the same step count is as fast or faster with
    a PSNR as high or higher (above), within 5 % of its speed and 0.5 dB of its PSNR (equal), or
    neither (below). A row that cached nothing is no comparison."""
    lines = []
    for p in rows:
        if p.library not in ("diffusers", "cache-dit"):
            continue
        head = f"- {p.steps} steps, {p.method} ({p.psnr:.2f} dB at {p.speedup:.2f}x, {p.flop_ratio:.0%} FLOPs)"
        if p.flop_ratio >= 0.999:
            lines.append(f"{head}: cached nothing at this setting, no comparison")
            continue
        ours = [r for r in rows if r.steps == p.steps and r.library == "duca" and r.flop_ratio < 0.999]
        better = [r for r in ours if r.speedup >= p.speedup and r.psnr >= p.psnr]
        close = [r for r in ours if r.speedup >= 0.95 * p.speedup and r.psnr >= p.psnr - 0.5]
        faster = [r for r in ours if r.speedup >= p.speedup]
        if better:
            word, best = "above", max(better, key=lambda r: (r.psnr, r.speedup))
        elif close:
            word, best = "equal", max(close, key=lambda r: (r.psnr, r.speedup))
        else:
            word = "below"
            best = max(faster, key=lambda r: r.psnr) if faster else max(ours, key=lambda r: r.speedup)
        lines.append(f"{head}: **{word}** — {len(better)} duca rows as fast or faster with a PSNR as high or "
                     f"higher; {'best' if word != 'below' else 'nearest'} {best.method} {best.knob}: "
                     f"{best.psnr:.2f} dB at {best.speedup:.2f}x")
    return lines


def best_at(rows: list[Row], targets=(1.5, 2.0, 2.5, 3.0, 3.5)) -> list[str]:
    """Per step count and speed-up target: the caching row (any library) at least that fast with
    the highest PSNR, or none. What the README's "Which method" table is read from."""
    lines = []
    for steps in sorted({r.steps for r in rows}):
        for target in targets:
            fast = [r for r in rows if r.steps == steps and r.flop_ratio < 0.999 and r.speedup >= target]
            if not fast:
                lines.append(f"- {steps} steps, {target:.1f}x or more: no row")
                continue
            r = max(fast, key=lambda r: (r.psnr, r.speedup))
            lines.append(f"- {steps} steps, {target:.1f}x or more: {r.method} {r.knob} ({r.library}), {r.psnr:.2f} dB, "
                         f"{r.score:.1%} score, at {r.speedup:.2f}x")
    return lines
