"""``python -m benchmarks gpu --out DIR [--device cuda|cpu] [--tiny] [--sections a,b]``: the one
prepared GPU check. Sections (each in ``gpu_<name>.py``):

* correctness: compiled cached models against the eager oracle, fp32 and bf16, tiny DiT / PixArt / Flux;
* speed: request latency, FLOP ratio, compile time and memory at full size (DiT-XL/2, FLUX.1-dev geometry);
* cudagraphs: ``mode="reduce-overhead"``: recordings per variant, outputs, per-mode call latency;
* peer: cache-dit DBCache forced to FORA's computed steps, against duca FORA.

Each section runs on its own: one that raises is recorded as failed (with its traceback's end) and
the next one still runs; ``gpu.json`` / ``gpu.md`` are rewritten after every row and section, so a
run killed by a time limit still leaves what it measured. Rerunning with ``--sections`` into the same
folder replaces those sections and keeps the others.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import pathlib
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from .gpu_report import gpu_environment, markdown, plot

__all__ = ["SECTIONS", "Context", "Section", "Skip", "run", "run_sections"]

# section -> (module, share of the time budget). Shares: what each took in estimates for one H100
# (compile-bound); a row or case that would start past its section's share is skipped and named.
SECTIONS = {"correctness": ("gpu_correctness", 0.30), "speed": ("gpu_speed", 0.43),
            "cudagraphs": ("gpu_cudagraphs", 0.15), "peer": ("gpu_peer", 0.12)}
# the check must end inside a 10-minute call with the wheels' install before it; a row started just
# before its deadline still runs to its end
DEFAULT_BUDGET_S = {"cuda": 450.0, "cpu": None}
TRACEBACK_LINES = 12


class Skip(Exception):
    """Raised by a section that cannot run here (a missing optional package): recorded as skipped."""


@dataclass
class Context:
    """What a section runs on, and when it should stop starting new work."""

    device: str
    tiny: bool
    inner: str
    save: Callable[[], None] = lambda: None
    deadline: float | None = None          # time.perf_counter() value; None: no limit

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    @property
    def dtype(self) -> torch.dtype:
        """Full-size models run in bf16 on CUDA; the toy sizes in fp32."""
        return torch.bfloat16 if self.device == "cuda" and not self.tiny else torch.float32


@dataclass
class Section:
    name: str
    status: str = "running"
    seconds: float = 0.0
    inner: str | None = None
    rows: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    budget_skipped: list = field(default_factory=list)
    error: str | None = None

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @contextlib.contextmanager
    def attempt(self, what: str):
        """One row or case: an exception in it is a failed check (with its traceback's end) and the
        section goes on with the next one."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - recorded; the next row runs
            self.check(f"{what}: ran", False, _tail(e))

    def skip_for_time(self, what: str) -> None:
        self.budget_skipped.append(what)

    def finish(self) -> None:
        failed = [c["name"] for c in self.checks if not c["ok"]]
        if self.status != "running":
            return
        self.status = "failed" if failed else "partial" if self.budget_skipped else "ok"
        if failed:
            self.error = f"{len(failed)} of {len(self.checks)} checks failed: " + "; ".join(failed)


def _tail(exc: BaseException) -> str:
    lines = "".join(traceback.format_exception(exc)).rstrip().splitlines()
    return "\n".join(lines[-TRACEBACK_LINES:])


def run_sections(names, ctx: Context, results: dict, save: Callable[[], None], modules: dict | None = None,
                 budget_s: float | None = None) -> dict:
    """Run ``names`` in order; each one's ``Section`` lands in ``results[name]``, whatever happens."""
    modules = modules or {}
    shares = {n: SECTIONS.get(n, ("", 1.0))[1] for n in names}
    end = time.perf_counter() + budget_s if budget_s else None
    for i, name in enumerate(names):
        section = results[name] = Section(name)
        start = time.perf_counter()
        # this section's share of what is left: time an earlier section did not use goes to the later ones
        left = [shares[n] for n in names[i:]]
        ctx.deadline = start + (end - start) * shares[name] / sum(left) if end else None
        print(f"== {name} ...", flush=True)
        try:
            module = modules.get(name) or importlib.import_module(f".{SECTIONS[name][0]}", __package__)
            section.inner = getattr(module, "INNER", lambda c: c.inner)(ctx)
            module.run(ctx, section)
        except Skip as e:
            section.status, section.error = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - recorded; the next section runs
            section.status, section.error = "failed", _tail(e)
        finally:
            section.seconds = time.perf_counter() - start
            section.finish()
            torch._dynamo.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            save()
        print(f"== {name}: {section.status} in {section.seconds:.1f} s"
              + (f" ({section.error.splitlines()[-1]})" if section.error else ""), flush=True)
    return results


def _as_json(section) -> dict:
    return section if isinstance(section, dict) else dict(section.__dict__)


def run(args) -> dict:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (use --device cpu --tiny for the CPU run)")
    names = [s.strip() for s in (args.sections or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    inner = args.inner or ("inductor" if device == "cuda" or not args.tiny else "aot_eager")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu.json"
    kept = {}
    if path.exists():                          # a rerun of some sections keeps the others' results
        try:
            kept = json.loads(path.read_text()).get("sections", {})
        except (OSError, ValueError):
            kept = {}
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")     # read once, at cache-dit's import (environment's)
    env = gpu_environment(device)
    arg_record = {"device": device, "tiny": bool(args.tiny), "inner": inner, "sections": names}
    results: dict = {}

    def save() -> None:
        merged = {n: _as_json(kept[n]) for n in SECTIONS if n in kept and n not in results}
        merged.update({n: _as_json(s) for n, s in results.items()})
        ordered = {n: merged[n] for n in SECTIONS if n in merged}
        path.write_text(json.dumps({"environment": env, "args": arg_record, "sections": ordered}, indent=1,
                                   default=str) + "\n")
        (out / "gpu.md").write_text(markdown(env, arg_record, ordered))

    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[device]
    ctx = Context(device=device, tiny=bool(args.tiny), inner=inner, save=save)
    start = time.perf_counter()
    run_sections(names, ctx, results, save, budget_s=budget)
    plot(out, results)
    save()
    print(f"\nGPU check on {env.get('gpu', device)} ({time.perf_counter() - start:.0f} s): {out / 'gpu.md'}")
    for name, s in results.items():
        failed = [c["name"] for c in s.checks if not c["ok"]]
        print(f"  {name:12s} {s.status:8s} {s.seconds:6.1f} s  checks {len(s.checks) - len(failed)}/{len(s.checks)}"
              + (f"  FAILED: {'; '.join(failed)[:200]}" if failed else "")
              + (f"  ({s.error.splitlines()[-1][:200]})" if s.error and not failed else ""))
    return results
