"""The GPU check's report: the environment it ran on, ``gpu.md`` and the speed plot."""
from __future__ import annotations

import importlib
import importlib.util
import pathlib
import platform
import subprocess

import torch

from .results_io import environment, markdown_table

__all__ = ["gpu_environment", "markdown", "plot"]


def gpu_environment(device: str) -> dict:
    env = environment(device)
    env["python"] = platform.python_version()
    for name in ("triton", "duca_compile"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001 - recorded as what it is
            env[name] = f"unknown ({type(e).__name__})"
    env["torch_cuda"] = torch.version.cuda
    if device == "cuda":
        env["driver"] = _driver_version()
    return env


def _driver_version() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
        reason = f"nvidia-smi exit {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = f"nvidia-smi: {type(e).__name__}"
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as e:  # noqa: BLE001
        return f"unknown ({reason}; pynvml: {type(e).__name__})"


def markdown(env: dict, args: dict, results: dict) -> str:
    lines = ["# GPU check", "", "Measured on: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             f"Command: `python -m benchmarks gpu --device {args['device']}{' --tiny' if args['tiny'] else ''}"
             f"` (sections {', '.join(results)}).", "",
             "| section | status | seconds | inner compiler | checks passed |", "|---|---|---|---|---|"]
    for name, s in results.items():
        passed = sum(c["ok"] for c in s["checks"])
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} | {s['inner'] or '–'} | "
                     f"{passed} / {len(s['checks'])} |")
    for name, s in results.items():
        module = _module_or_none(name)
        lines += ["", f"## {name}: {s['status']}", ""]
        if module is not None and getattr(module, "ABOUT", ""):
            lines += [module.ABOUT.strip(), ""]
        if s["rows"] and module is not None:
            lines += [markdown_table(s["rows"], module.COLUMNS), ""]
        lines += [f"- {n}" for n in s["notes"]]
        if s["budget_skipped"]:
            lines.append("- not run, out of this section's share of the time budget (rerun it alone with "
                         f"`--sections {name}`): " + "; ".join(s["budget_skipped"]))
        failed = [c for c in s["checks"] if not c["ok"]]
        if s["checks"]:
            lines.append(f"- checks: {len(s['checks']) - len(failed)} of {len(s['checks'])} passed"
                         + "".join(f"\n  - FAILED {c['name']}: " + _inline(c["detail"]) for c in failed))
        if s["error"]:
            lines += ["", "```", s["error"], "```"]
    return "\n".join(lines) + "\n"


def _inline(detail: str) -> str:
    """A check's detail inside a list item; a traceback as an indented code block under it."""
    if "\n" not in detail:
        return detail
    return "\n\n    ```\n" + "".join(f"    {line}\n" for line in detail.splitlines()) + "    ```\n"


def _module_or_none(name: str):
    try:
        from .gpu import SECTIONS

        return importlib.import_module(f".{SECTIONS[name][0]}", __package__)
    except Exception:  # noqa: BLE001 - its failure is in the section's error already
        return None


def plot(out: pathlib.Path, results: dict) -> None:
    """Wall-clock against FLOP speed-up per speed row, when matplotlib is there (not in the smoke venvs)."""
    rows = [r for r in getattr(results.get("speed"), "rows", []) if r.get("speedup") and r.get("flop_speedup")]
    if not rows:
        return
    if importlib.util.find_spec("matplotlib") is None:
        return
    from .results_io import plot_bars

    plot_bars(rows, out / "gpu.png", lambda r: f"{r['size']} {r['method']}",
              {"wall-clock speed-up": "speedup", "FLOP speed-up": "flop_speedup"}, "speed-up vs plain compile",
              title="GPU check: speed")
