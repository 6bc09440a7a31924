"""Writing benchmark results under ``benchmarks/results/``: markdown tables (with the device,
versions, commit and date they were measured on, and a fingerprint of each preset they used),
JSON, and PNG plots."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import pathlib
import platform
import subprocess

import torch

__all__ = ["RESULTS", "environment", "get", "preset_fingerprints", "stale_presets", "commit", "markdown_table", "write", "plot_tradeoff", "plot_bars", "sample_grid"]

RESULTS = pathlib.Path(__file__).parent / "results"


def commit() -> str:
    """The checkout's short commit, ``+dirty`` when the code that measures (``duca_compile/``,
    ``benchmarks/`` outside ``results/`` and its Markdown) differs from it; ``unknown`` outside a
    git checkout."""
    root = pathlib.Path(__file__).parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "duca_compile", "benchmarks",
                                  ":!benchmarks/results", ":!*.md"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if changed else "")


def preset_fingerprints(names) -> dict[str, str]:
    """``"model:method"`` -> a hash of that preset's config as the code builds it now. A results
    file stores these; ``stale_presets`` compares them with the current code, so a table made
    before a preset changed fails a test instead of misleading a reader."""
    from duca_compile import presets

    out = {}
    for name in sorted(set(names)):
        model, method = name.split(":")
        canonical = json.dumps(_explicit(presets(model, method)), sort_keys=True)
        out[name] = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    return out


def _explicit(value):
    """A config as its class and the fields that differ from the class defaults (nested configs
    alike): a field added later with a default that keeps the old behaviour leaves the hash as it
    was; a preset that sets a field differently changes it. A changed class default is a change of
    the method, not of a preset, and is not caught here."""
    if dataclasses.is_dataclass(value):
        fields = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            default = (f.default if f.default is not dataclasses.MISSING else f.default_factory()
                       if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if v != default:
                fields[f.name] = _explicit(v)
        return [type(value).__name__, fields]
    if isinstance(value, (tuple, list)):
        return [_explicit(v) for v in value]
    return repr(value)


def stale_presets(recorded: dict[str, str]) -> list[str]:
    """The presets of ``recorded`` (a results file's ``presets``) whose config has changed since."""
    stale = []
    for name, digest in recorded.items():
        try:
            now = preset_fingerprints([name])[name]
        except ValueError:                     # the preset is gone
            now = None
        if now != digest:
            stale.append(name)
    return stale


def environment(device: str = "cpu") -> dict:
    import diffusers

    env = {"commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "device": device, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for peer in ("cache_dit",):
        try:
            env[peer] = __import__(peer).__version__
        except Exception:  # noqa: BLE001 - not installed: not part of this run
            pass
    return env


def get(row, attr):
    """A row's field, whether the row is a dataclass or a dict read back from JSON."""
    return getattr(row, attr) if dataclasses.is_dataclass(row) else row[attr]


def markdown_table(rows: list, columns: dict) -> str:
    """``columns``: header -> (attribute, format). Rows are dataclasses or dicts."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    body = ["| " + " | ".join(fmt.format(get(r, a)) if get(r, a) is not None else "–"
                              for a, fmt in columns.values()) + " |" for r in rows]
    return "\n".join([head, *body])


def write(out: pathlib.Path, name: str, title: str, text: str, data, env: dict, presets=()) -> pathlib.Path:
    """``presets``: the ``"model:method"`` presets the rows used (their fingerprints are stored)."""
    out.mkdir(parents=True, exist_ok=True)
    fingerprints = preset_fingerprints(presets)
    header = f"# {title}\n\nMeasured on: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "\n\n"
    if fingerprints:
        header += "Presets (config fingerprints): " + ", ".join(f"`{k}` {v}" for k, v in fingerprints.items()) + "\n\n"
    path = out / f"{name}.md"
    path.write_text(header + text.rstrip() + "\n")
    (out / f"{name}.json").write_text(json.dumps(
        {"environment": env, "presets": fingerprints, "rows": [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in data]},
        indent=1, default=float) + "\n")
    return path


def plot_tradeoff(rows: list, path: pathlib.Path, x: str = "speedup", y: str = "psnr",
                  xlabel: str = "wall-clock speed-up vs plain torch.compile", ylabel: str = "PSNR vs uncached (dB)"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list] = {}
    for r in rows:
        if get(r, "method") != "uncached":
            groups.setdefault(get(r, "method"), []).append(r)
    colors = plt.get_cmap("tab20").colors
    ours = []
    for i, (method, rs) in enumerate(groups.items()):
        peer = method.startswith(("cache-dit", "diffusers"))      # one setting each: a point, no knob
        rs = sorted(rs, key=lambda r: get(r, x))                  # each method's own front, left to right
        ours += [] if peer else rs
        ax.plot([get(r, x) for r in rs], [get(r, y) for r in rs], marker="s" if peer else "o",
                ls="none" if peer else "-", color=colors[i % len(colors)], label=method, ms=7 if peer else 4)
        for r in rs if not peer else ():
            if get(r, "knob") not in ("preset", "-"):
                ax.annotate(get(r, "knob").split(" ")[0].replace("N=", ""), (get(r, x), get(r, y)), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    front, best = [], float("-inf")          # duca's upper envelope: no duca row is both faster and better
    for r in sorted(ours, key=lambda r: -get(r, x)):
        if get(r, y) > best:
            front.append(r)
            best = get(r, y)
    if front:
        ax.plot([get(r, x) for r in front], [get(r, y) for r in front], color="black", ls="--", lw=1, alpha=0.6,
                label="duca front (all methods)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_grid(drawn: dict, labels: torch.Tensor, path: pathlib.Path, per_row: int = 10):
    """One row per method, the same seeds in every column (labels 0..9 for the first ten)."""
    from duca_compile.demo import write_image_rows

    write_image_rows(path, drawn, column_titles=[int(y) for y in labels[:per_row]], columns=per_row)


def plot_bars(rows: list, path: pathlib.Path, label, series: dict, ylabel: str, title: str = "") -> None:
    """Grouped bars: one group per row (``label(row)``), one bar per ``series`` name -> attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(rows) + 2), 3.8))
    width = 0.8 / len(series)
    for j, (name, attr) in enumerate(series.items()):
        values = [get(r, attr) or 0.0 for r in rows]
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))], values, width=width, label=name)
    ax.set_xticks(range(len(rows)), [label(r) for r in rows], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

