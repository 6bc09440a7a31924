"""``python -m duca_compile.doctor``: is this environment one duca-compile was tested on, and does
Inductor work here?

Prints Python, torch, diffusers and CUDA versions against the tested ranges, resolves every
private torch API duca uses (``duca_compile._torch``), runs one tiny Inductor compile on the
device, and lists the optional pieces found. ``duca_compile.check()`` returns the same as a dict.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time

import torch

from . import _torch
from .versions import TESTED_DIFFUSERS, TESTED_PYTHON, in_range, range_text, version_of

__all__ = ["check", "main", "report", "OPTIONAL"]

# module -> what duca uses it for
OPTIONAL = {"depyf": "duca_compile.dump decompiles Dynamo's bytecode",
            "torchao": "quantized transformers (tested: int8 / float8 weight-only, int8 dynamic)",
            "cache_dit": "the benchmarks' DBCache peer",
            "transformers": "diffusers' text-conditioned pipelines (PixArt, Flux, SD3, ...)"}


def _inductor(device: str) -> dict:
    """One tiny compile with plain Inductor on ``device``, against eager."""
    def fn(x, w):
        return torch.nn.functional.gelu(x @ w) + x

    x = torch.randn(8, 8, device=device)
    w = torch.randn(8, 8, device=device)
    start = time.perf_counter()
    try:
        compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False)
        ok = torch.allclose(compiled(x, w), fn(x, w), atol=1e-5, rtol=1e-4)
        error = "" if ok else "the compiled result differs from eager"
    except Exception as e:  # noqa: BLE001 - a diagnosis: report whatever broke, never raise
        ok, error = False, f"{type(e).__name__}: {e}"[:300]
    finally:
        torch.compiler.reset()
    return {"device": device, "ok": ok, "error": error, "seconds": round(time.perf_counter() - start, 1)}


def check(device: str | None = None, compile: bool = True) -> dict:
    """Versions against the tested ranges, the private torch surface, an Inductor compile on
    ``device`` (default: CUDA when available, else CPU; ``compile=False`` skips it) and the
    optional packages present."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    diffusers = version_of("diffusers")
    surface = _torch.check_surface()
    return {
        "python": {"version": platform.python_version(), "tested": range_text(TESTED_PYTHON),
                   "in_range": in_range(platform.python_version(), TESTED_PYTHON)},
        "torch": {"version": torch.__version__, "tested": range_text(_torch.TESTED_TORCH),
                  "in_range": _torch.in_tested_range(), "cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(),
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "diffusers": {"version": diffusers, "tested": range_text(TESTED_DIFFUSERS),
                      "in_range": in_range(diffusers, TESTED_DIFFUSERS)},
        "private_api": {"present": sum(not err for _, _, err in surface), "total": len(surface),
                        "missing": {name: err for name, _, err in surface if err}},
        "inductor": _inductor(device) if compile else None,
        "optional": {name: version_of(name.replace("_", "-")) if importlib.util.find_spec(name) else None
                     for name in OPTIONAL},
    }


def _mark(in_range) -> str:
    return {True: "tested", False: "NOT in the tested range", None: "not installed"}[in_range]


def report(result: dict) -> str:
    lines = []
    for name in ("python", "torch", "diffusers"):
        r = result[name]
        lines.append(f"{name:10s} {r['version'] or '-':14s} {_mark(r['in_range'])} ({r['tested']})")
    t = result["torch"]
    lines.append(f"{'cuda':10s} {t['cuda'] or '-':14s} " +
                 (f"available: {t['gpu']}" if t["cuda_available"] else "no GPU visible"))
    api = result["private_api"]
    lines.append(f"{'torch API':10s} {api['present']}/{api['total']} private APIs duca uses are present")
    for err in api["missing"].values():
        lines.append(f"  missing: {err}")
    ind = result["inductor"]
    if ind is not None:
        state = "works" if ind["ok"] else f"FAILS: {ind['error']}"
        lines.append(f"{'inductor':10s} {ind['device']:14s} {state} ({ind['seconds']} s for one tiny compile)")
    for name, version in result["optional"].items():
        lines.append(f"{'optional':10s} {name:14s} {version or 'not installed'}: {OPTIONAL[name]}")
    return "\n".join(lines)


def healthy(result: dict) -> bool:
    ind = result["inductor"]
    return not result["private_api"]["missing"] and (ind is None or ind["ok"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m duca_compile.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="device for the Inductor check (default: cuda if available)")
    p.add_argument("--no-compile", action="store_true", help="skip the Inductor compile")
    args = p.parse_args(argv)
    result = check(args.device, compile=not args.no_compile)
    print(report(result))
    return 0 if healthy(result) else 1


if __name__ == "__main__":
    sys.exit(main())
